"""``r2d2voice events`` following a running ``r2d2voice run`` on the PulseAudio rig
(tests/pulse.py, driven as in tests/test_run_live.py): the person speaks into the microphone,
R2 answers on the speaker, and the follower sees the turn and the speaker's level about 20 times
a second while the reply plays; it exits 0 when the run stops."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pulse import PulseRig
from support import NotifyListener
from test_run_live import REPLY_SECONDS, run_service, service_env, speech  # noqa: F401

pytestmark = pytest.mark.pulse


class Follower:
    """``python -m r2d2voice events --level`` with the run's environment; its lines as they
    come (a thread reads them)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r2d2voice", "events", "--level"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.moments: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.moments.append(json.loads(line))

    def names(self) -> list[str]:
        return [m["event"] for m in self.moments if m["event"] != "level"]

    def wait(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=15)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_events_follows_a_running_run_and_the_speakers_level_while_r2_replies(
        pulse_rig: PulseRig, tmp_path: Path, speech: Path) -> None:  # noqa: F811
    runtime = tmp_path / "rt"
    with NotifyListener() as notify, run_service(
        pulse_rig, tmp_path, notify, ["--output-device", "pulse"], R2D2_INPUT_DEVICE="pulse",
        RUNTIME_DIRECTORY=str(runtime),
    ) as service:
        service.wait_ready()
        follower = Follower(service_env(pulse_rig, notify, RUNTIME_DIRECTORY=str(runtime)))
        service.wait_for("the follower", lambda: "events: a follower joined" in service.log(),
                         timeout=20)
        pulse_rig.play(speech)

        def replied() -> bool:
            names = follower.names()
            return "spoken" in names and names[-1] == "listening"

        service.wait_for("the reply to play out", replied, timeout=20)
        code = service.terminate()
    assert code == 0, service.log()
    exit_code, err = follower.wait()
    assert exit_code == 0 and err == "", err
    moments = follower.moments
    turn = ["user_speaking", "user_stopped", "thinking", "speaking", "spoken", "listening"]
    names = [name for name in follower.names() if name in turn]
    at = names.index("user_speaking")
    assert names[at:at + len(turn)] == turn, names
    # the speaker's level while the reply plays: ~20 a second, all within speaking..spoken
    start = next(i for i, m in enumerate(moments) if m["event"] == "speaking")
    end = next(i for i, m in enumerate(moments) if m["event"] == "spoken")
    speaking, spoken = moments[start], moments[end]
    assert spoken["item_id"] == speaking["item_id"] and spoken["interrupted"] is False
    assert spoken["played_ms"] == pytest.approx(REPLY_SECONDS * 1000, abs=50)
    levels = [m for m in moments[start:end] if m["event"] == "level"]
    assert not [m for m in moments[:start] + moments[end + 1:] if m["event"] == "level"]
    seconds = spoken["played_ms"] / 1000
    assert 0.8 * 20 * seconds <= len(levels) <= 20 * seconds + 2
    # R2's beeps peak at -12 dBFS (0.25): the level moves with them, never beyond
    rms = [m["rms"] for m in levels]
    assert max(rms) > 0.05 and all(0 <= r <= 0.25 for r in rms)
    assert min(rms) < max(rms) / 2  # the beeps come and go: it flickers with the voice
    said = [(m["role"], m["text"]) for m in moments if m["event"] == "transcript"]
    assert [role for role, _ in said] == ["user", "assistant"]
    assert f"r2: {said[1][1]}" in service.log()  # what the journal has too
    # all of the run's session, on the machine's monotonic clock, in order
    session = {m["session_id"] for m in moments if m["event"] in turn}
    assert len(session) == 1 and None not in session
    monos = [m["mono"] for m in moments]
    assert monos == sorted(monos)
    assert levels[0]["mono"] - speaking["mono"] < 0.2 and spoken["mono"] - levels[-1]["mono"] < 0.3
