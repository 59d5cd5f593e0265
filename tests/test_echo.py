"""Echo: ``r2d2voice run`` in a room where its speaker is louder at the microphone than a person.

On the PulseAudio rig (tests/pulse.py) a process of the test is the room (tests/room.py,
tests/room_process.py): it reads what ``run`` plays from ``speaker.monitor`` and plays its echo
into the ``mic`` sink — soft clipping, a 1.5 ms direct path, early reflections, a 0.3 s
reverberant tail, a fan at -55 dBFS — at ``echo_db`` relative to the person. The person is a
recording played into ``mic`` alongside, at a normal voice (-30 dBFS median 20 ms frame).
``run`` talks to a local backend in the test process, whose VAD is an energy VAD (server_vad
defaults): anything of the robot's own voice that got through would become a turn.

With the default ``R2D2_ECHO=aec``: the robot never hears itself (one reply per turn, played to
its end), a person talking over a reply is heard and the reply truncated where it stopped, and
every turn reaches the service. ``half`` (today's gate) holds the microphone while it plays.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import trio
from pulse import PulseRig
from room import echo_gain_for, person_at, to_int16
from support import SCRUBBED_PREFIXES, espeak_pcm

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.localbackend.server import BackendConfig, serve_local

pytestmark = pytest.mark.pulse

HERE = Path(__file__).resolve().parent
RATE = 48000
PERSON_VOICE = ("-v", "en+f3", "-p", "70")
#: a turn ends after 300 ms of silence (the default 500 ms only makes the test slower)
VAD_SILENCE_MS = 300
REPLY_SECONDS = 3.0


@contextlib.contextmanager
def room(rig: PulseRig, echo_db: float) -> Iterator[None]:
    """The room between the rig's speaker and microphone, echo ``echo_db`` above the person
    (calibrated on the local backend's beeps, which is what ``run`` will play)."""
    beeps, _ = r2_reply(b"calibration", REPLY_SECONDS)
    played = to_int16(soxr.resample(beeps.astype(np.float32) / 32768, 24000, RATE))
    gain = echo_gain_for(played, RATE, echo_db)
    env = {**rig.env, "PULSE_SOURCE": "speaker.monitor", "PULSE_SINK": "mic"}
    proc = subprocess.Popen([sys.executable, str(HERE / "room_process.py"), repr(gain)],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def person(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the person says, at a normal voice, as WAV files."""
    tmp = tmp_path_factory.mktemp("person")
    out = {}
    for name, text in (("hello", "Hello R2."),
                       ("question", "wait what time is it now tell me the time please"),
                       ("thanks", "Thank you.")):
        pcm = person_at(espeak_pcm(text, tmp, rate=RATE, voice=PERSON_VOICE), RATE)
        out[name] = tmp / f"{name}.wav"
        sf.write(out[name], to_int16(pcm), RATE, subtype="PCM_16")
    return out


@dataclass
class Run:
    """What one ``r2d2voice run`` left behind."""

    messages: list[dict[str, Any]]
    stats: dict[str, int]
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def of_role(self, role: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["role"] == role]

    def client_events(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == type_]

    def describe(self) -> str:
        rows = [(m["role"], m["text"][:30], m["interrupted"], m["played_ms"])
                for m in self.messages]
        return f"messages: {rows}\nstats: {self.stats}\nstderr:\n{self.stderr[-4000:]}"


def _read_db(db: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    if not db.exists():
        return [], {}
    con = sqlite3.connect(db)
    try:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM messages ORDER BY created_at, id")]
        stats: dict[str, int] = {}
        for (meta,) in con.execute("SELECT metadata FROM sessions"):
            for k, v in (json.loads(meta or "{}").get("stats") or {}).items():
                stats[k] = stats.get(k, 0) + v
    finally:
        con.close()
    return rows, stats


def _count(db: Path, role: str) -> int:
    try:
        return sum(m["role"] == role for m in _read_db(db)[0])
    except sqlite3.OperationalError:  # the file exists but its schema is not written yet
        return 0


async def until(db: Path, role: str, count: int, timeout: float = 15) -> None:
    """Until ``count`` messages of ``role`` are stored (one that never comes shows in the
    assertions on what was stored)."""
    with trio.move_on_after(timeout):
        while _count(db, role) < count:
            await trio.sleep(0.05)


async def say(rig: PulseRig, path: Path) -> None:
    """The person says ``path`` into the microphone (returns once it has been played)."""
    await trio.run_process(["paplay", "--device=mic", os.fspath(path)], env=rig.env,
                           capture_stdout=True, capture_stderr=True)


class Notifications:
    """The sd_notify datagrams the service sends (read as they come)."""

    def __init__(self) -> None:
        self.name = f"r2d2voice-test-echo-{secrets.token_hex(6)}"
        self.ready = trio.Event()
        self.statuses: list[str] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind("\0" + self.name)  # abstract: "@name" in NOTIFY_SOCKET
            task_status.started()
            while True:
                for line in (await sock.recv(4096)).decode().splitlines():
                    if line == "READY=1":
                        self.ready.set()
                    elif line.startswith("STATUS="):
                        self.statuses.append(line[len("STATUS="):])

    async def wait_ready(self, proc: trio.Process) -> None:
        with trio.fail_after(30):
            while not self.ready.is_set():
                if proc.returncode is not None:
                    raise AssertionError(f"r2d2voice run exited with {proc.returncode}")
                with trio.move_on_after(0.2):
                    await self.ready.wait()


async def converse(rig: PulseRig, tmp_path: Path, script: Callable[[Path], Awaitable[None]],
                   **env_extra: str) -> Run:
    """``r2d2voice run`` on the rig; once it is ready, ``await script(db)``, then SIGTERM."""
    db = tmp_path / "conversation.db"
    events: list[dict[str, Any]] = []
    config = BackendConfig(reply_seconds=REPLY_SECONDS, realtime_factor=20,
                           observer=lambda _sid, event: events.append(event))
    notify = Notifications()
    env = {k: v for k, v in rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(HOME=str(tmp_path), NOTIFY_SOCKET="@" + notify.name,
               R2D2_VAD_SILENCE_MS=str(VAD_SILENCE_MS), **env_extra)
    log = tmp_path / "run.log"
    with open(log, "wb") as stderr:
        async with trio.open_nursery() as nursery:
            await nursery.start(notify.serve)
            port = await nursery.start(serve_local, "127.0.0.1", 0, config)
            argv = [sys.executable, "-m", "r2d2voice", "--log-level", "DEBUG", "run",
                    "--input-device", "pulse", "--output-device", "pulse",
                    "--backend", "local", "--url", f"ws://127.0.0.1:{port}/v1/realtime",
                    "--db", str(db)]
            proc: trio.Process = await nursery.start(lambda task_status: trio.run_process(
                argv, cwd=tmp_path, env=env, stderr=stderr, check=False,
                task_status=task_status))
            try:
                await notify.wait_ready(proc)
                await script(db)
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    await proc.wait()
            nursery.cancel_scope.cancel()
    messages, stats = _read_db(db)
    run = Run(messages, stats, events, log.read_text(errors="replace"))
    assert proc.returncode == 0, run.describe()
    return run


#: after a reply: the room's tail, a VAD onset and the silence that would close a turn made
#: of echo, and the devices' latencies
AFTER_REPLY = 1.5


@pytest.mark.parametrize("echo_db", [-10, 5, 13])
async def test_the_robot_never_hears_itself_and_plays_its_replies_to_the_end(
        pulse_rig, person, tmp_path, echo_db):
    async def script(db: Path) -> None:
        await say(pulse_rig, person["hello"])
        await until(db, "assistant", 1)
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)
        await say(pulse_rig, person["thanks"])
        await until(db, "assistant", 2)
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)

    with room(pulse_rig, echo_db):
        run = await converse(pulse_rig, tmp_path, script)

    # the person spoke twice, the robot answered twice: no turn made of its own voice
    assert [m["role"] for m in run.messages] == ["user", "assistant"] * 2, run.describe()
    for reply in run.of_role("assistant"):
        assert reply["interrupted"] == 0, run.describe()
        assert reply["played_ms"] is None, run.describe()  # not truncated: played to its end
    assert not run.client_events("conversation.item.truncate")
    assert run.stats["frames_gated"] == 0  # full duplex: every frame went to the service


# +13 dB barge-in is asserted in the simulated room (tests/test_echo_stage.py): on the rig, whose
# speaker->mic delay drifts 60-230 ms as no room's does, it failed about once in a dozen idle
# runs (issue 16 stays open for it)
@pytest.mark.parametrize("echo_db", [5])
async def test_a_person_talking_over_a_reply_is_heard_and_the_reply_truncated(
        pulse_rig, person, tmp_path, echo_db):
    async def script(db: Path) -> None:
        await say(pulse_rig, person["hello"])
        await until(db, "assistant", 1)
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)  # a first reply, heard to its end
        await say(pulse_rig, person["thanks"])
        await until(db, "assistant", 2)
        await trio.sleep(1.0)  # the second reply is playing: talk over it
        await say(pulse_rig, person["question"])
        await until(db, "assistant", 3)
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)

    with room(pulse_rig, echo_db):
        run = await converse(pulse_rig, tmp_path, script)

    assert [m["role"] for m in run.messages] == ["user", "assistant"] * 3, run.describe()
    first, second, third = run.of_role("assistant")
    assert first["interrupted"] == third["interrupted"] == 0, run.describe()
    assert second["interrupted"] == 1, run.describe()  # heard over the reply ...
    assert 500 < second["played_ms"] < REPLY_SECONDS * 1000, run.describe()  # ... mid-way
    (truncate,) = run.client_events("conversation.item.truncate")
    assert truncate["audio_end_ms"] == second["played_ms"]  # the service keeps what was heard
    assert run.stats["interruptions"] == 1, run.describe()
    assert run.stats["frames_gated"] == 0


async def test_half_duplex_holds_the_microphone_while_the_robot_speaks(
        pulse_rig, person, tmp_path):
    async def script(db: Path) -> None:
        await say(pulse_rig, person["hello"])
        await until(db, "assistant", 1)
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)

    with room(pulse_rig, -10):
        run = await converse(pulse_rig, tmp_path, script, R2D2_ECHO="half")

    assert [m["role"] for m in run.messages] == ["user", "assistant"], run.describe()
    assert run.of_role("assistant")[0]["interrupted"] == 0
    # while the reply played the mic was held back: ~3.3 s of 20 ms frames never sent
    assert run.stats["frames_gated"] >= 0.9 * (REPLY_SECONDS + 0.3) / 0.02, run.describe()
