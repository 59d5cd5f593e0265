"""``r2d2voice run --backend live`` on the PulseAudio rig (tests/pulse.py): one spoken turn
into the microphone, the reply on the speaker, against ``serve-local``'s GPT-Live mode in a
process of its own, full duplex (the rig has no acoustic path from speaker to microphone: a
headset, or an echo-cancelled source)."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from pulse import PulseRig
from support import NotifyListener, clean_env
from test_run_live import _active_windows, _tonality, run_service
from test_run_live import speech as speech  # the module's fixture: "Hello R2." as a WAV

pytestmark = pytest.mark.pulse


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_local(workdir: Path) -> Iterator[str]:
    """``r2d2voice serve-local`` on a loopback port; yields its GPT-Live URL."""
    port = _free_port()
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "r2d2voice", "serve-local", "--port",
                             str(port)], env=clean_env(HOME=str(workdir)), cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve-local did not start:\n{(workdir / 'serve.log').read_text()}")
            time.sleep(0.05)
        yield f"ws://127.0.0.1:{port}/v1/live/sessions"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_run_backend_live_answers_a_spoken_turn(pulse_rig: PulseRig, tmp_path: Path,
                                                 speech: Path) -> None:
    speaker = tmp_path / "speaker.wav"
    args = ["--output-device", "pulse", "--backend", "live", "--duplex", "full"]
    with serve_local(tmp_path) as url, NotifyListener() as notify, run_service(
            pulse_rig, tmp_path, notify, [*args, "--url", url], R2D2_INPUT_DEVICE="pulse",
    ) as service:
        service.wait_ready()
        with pulse_rig.record(speaker):
            pulse_rig.play(speech)

            def listening_after_reply() -> bool:
                statuses = notify.statuses()
                return "speaking" in statuses and statuses[-1] == "listening"

            service.wait_for("the reply to play out", listening_after_reply, timeout=20)
            time.sleep(0.5)
        code = service.terminate()
    log = service.log()
    assert code == 0, log
    assert "Traceback" not in log
    statuses = notify.statuses()
    assert statuses.index("listening (you are speaking)") < statuses.index("speaking")
    with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as db:
        messages = db.execute("SELECT role, text, item_id FROM messages ORDER BY seq").fetchall()
        sessions = db.execute("SELECT backend, model, ended_at FROM sessions").fetchall()
    assert [m[0] for m in messages] == ["user", "assistant"], messages
    assert messages[0][1].startswith("(speech, ") and "R2 answers in beeps" in messages[1][1]
    assert all(m[2].startswith("live_") for m in messages)  # the Live core's record
    [(backend, model, ended_at)] = sessions
    assert (backend, model) == ("local", "local") and ended_at  # SIGTERM closed it
    assert f"r2: {messages[1][1]}" in log
    # the reply came out of the speaker: beeps after the speech
    pcm, rate = soundfile.read(speaker, dtype="float64")
    active = _active_windows(pcm, rate)
    assert len(active), "the speaker stayed silent"
    said, said_rate = soundfile.read(speech, dtype="float64")
    assert active[0] * 0.02 > len(said) / said_rate - 0.2  # not before the person spoke
    reply = pcm[active[0] * 960 : (active[-1] + 1) * 960]
    assert _tonality(reply, rate) > 0.8 and np.abs(reply).max() > 0.1
