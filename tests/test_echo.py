"""Echo: the robot must not interrupt itself when its speaker leaks into its microphone.

On the PulseAudio rig (tests/pulse.py) a loopback module routes the ``speaker`` sink's monitor
back into the ``mic`` sink, attenuated so the leak sits between the service's VAD threshold
(0.5 ~ -40 dBFS RMS) and the barge-in gate (-25 dBFS RMS), as a speaker next to a microphone
does. ``r2d2voice run`` talks to a local backend started in the test process whose replies
(2 s of beeps at -15 dBFS RMS) are long enough to talk over. In half duplex a person speaking
loudly over a reply still interrupts it, and the next reply plays to the end through the leak;
in full duplex the leak trips the VAD and the robot cuts itself off (which proves the rig
leaks).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio
from pulse import PulseRig
from support import SCRUBBED_PREFIXES

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.audio.vad import threshold_to_dbfs
from r2d2voice.localbackend.server import BackendConfig, serve_local

pytestmark = pytest.mark.pulse

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
HELLO = SAMPLES / "hello.wav"
HELLO_UNTIL_S = 1.15  # "Hello R2." (the rest of the sample only makes the test longer)
QUESTION = SAMPLES / "question.wav"
QUESTION_UNTIL_S = 1.2  # "What time is it ..."
#: a turn ends after 200 ms of silence (R2D2_VAD_SILENCE_MS; the default 500 ms only makes
#: the test slower)
VAD_SILENCE_MS = 200

#: Gain of the speaker -> microphone path: beeps at -15 dBFS RMS reach the mic at about
#: -33 dBFS RMS, 7 dB above the VAD threshold and 8 dB below the barge-in level.
LEAK_GAIN_DB = -18.0
VAD_DBFS = threshold_to_dbfs(0.5)  # R2D2_VAD_THRESHOLD default: -40 dBFS RMS
BARGE_IN_DBFS = -25.0  # R2D2_BARGE_IN_DBFS default
LOUD_DBFS = -10.0  # someone talking over the robot, close to the mic
REPLY_SECONDS = 2.0
#: After the reply: the echo tail (0.3 s), a VAD onset and the VAD_SILENCE_MS of silence that
#: would close a turn made of echo, and slack for device latencies.
AFTER_REPLY = 1.3


def _frame_dbfs(pcm: np.ndarray, rate: int) -> np.ndarray:
    """RMS level of each 20 ms frame, in dBFS."""
    n = rate // 50
    x = pcm[: len(pcm) // n * n].astype(np.float64).reshape(-1, n) / 32768
    return 20 * np.log10(np.sqrt(np.mean(x * x, axis=1)) + 1e-12)


def _sink_inputs(rig: PulseRig) -> set[str]:
    return {row.split()[0] for row in rig.clients("sink-inputs")}


@pytest.fixture(scope="module")
def leaky_room(pulse_rig: PulseRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[float]:
    """The speaker leaks into the mic at ``LEAK_GAIN_DB``; yields the leak's measured level
    (loudest 20 ms frame, dBFS RMS) for a reply played on the speaker."""
    rig = pulse_rig
    before = _sink_inputs(rig)
    module = rig.load_module("module-loopback", source="speaker.monitor", sink="mic",
                             latency_msec=20, source_dont_move="true", sink_dont_move="true")
    try:
        rig.wait_until(lambda: len(_sink_inputs(rig) - before) == 1)
        (loopback,) = _sink_inputs(rig) - before
        rig.pactl("--", "set-sink-input-volume", loopback, f"{LEAK_GAIN_DB:g}dB")
        # Calibrate: play a reply on the speaker, record what reaches the mic.
        tmp = tmp_path_factory.mktemp("leak")
        beeps, _ = r2_reply(b"calibration", 0.6)
        sf.write(tmp / "beeps.wav", beeps, 24000, subtype="PCM_16")
        with rig.record(tmp / "leak.wav", source="mic.monitor", rate=24000):
            rig.play(tmp / "beeps.wav", sink="speaker")
        heard, rate = sf.read(tmp / "leak.wav", dtype="int16")
        yield float(_frame_dbfs(heard, rate).max())
    finally:
        rig.unload_module(module)


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
        rows = [(m["role"], m["text"][:40], m["interrupted"], m["played_ms"])
                for m in self.messages]
        return f"messages: {rows}\nstats: {self.stats}\nstderr:\n{self.stderr[-3000:]}"


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


async def _play(rig: PulseRig, path: Path) -> None:
    """Say ``path`` into the microphone (returns when it has been played)."""
    await trio.run_process(["paplay", "--device=mic", os.fspath(path)], env=rig.env,
                           capture_stdout=True, capture_stderr=True)


class Notifications:
    """The sd_notify datagrams a service sends to ``$NOTIFY_SOCKET`` (read as they come, so
    its status updates never fill the socket)."""

    def __init__(self) -> None:
        self.name = f"r2d2voice-test-echo-{secrets.token_hex(6)}"
        self.ready = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind("\0" + self.name)  # abstract: "@name" in NOTIFY_SOCKET
            task_status.started()
            while True:
                if "READY=1" in (await sock.recv(4096)).decode().splitlines():
                    self.ready.set()

    async def wait_ready(self, proc: trio.Process) -> None:
        """Until the service says READY=1 (fails at once if it exits instead)."""
        with trio.fail_after(30):
            while not self.ready.is_set():
                if proc.returncode is not None:
                    raise AssertionError(f"r2d2voice run exited with {proc.returncode}")
                with trio.move_on_after(0.2):
                    await self.ready.wait()


def _count(db: Path, role: str) -> int:
    try:
        return sum(m["role"] == role for m in _read_db(db)[0])
    except sqlite3.OperationalError:  # the file exists but its schema is not written yet
        return 0


async def _until(db: Path, role: str, count: int, timeout: float = 10) -> None:
    """Until ``count`` messages of ``role`` are stored (a turn that never comes shows in the
    assertions on what was stored)."""
    with trio.move_on_after(timeout):
        while _count(db, role) < count:
            await trio.sleep(0.05)


def _trimmed(path: Path, tmp_path: Path, until_s: float, gain_dbfs: float | None = None
             ) -> Path:
    """``path`` from 0.25 s (its leading silence cut) to ``until_s``, optionally at
    ``gain_dbfs`` RMS while speaking, as a WAV file in ``tmp_path``."""
    speech, rate = sf.read(path, dtype="int16")
    speech = speech[rate // 4 : round(until_s * rate)]
    if gain_dbfs is not None:
        frames = _frame_dbfs(speech, rate)
        level = 10 * np.log10(np.mean(10 ** (frames[frames > -50] / 10)))  # while speaking
        gain = 10 ** ((gain_dbfs - level) / 20)
        speech = np.clip(np.round(speech * gain), -32768, 32767).astype(np.int16)
    out = tmp_path / f"{path.stem}-{gain_dbfs}.wav"
    sf.write(out, speech, rate, subtype="PCM_16")
    return out


async def converse(rig: PulseRig, tmp_path: Path, duplex: str,
                   script: Callable[[Path], Awaitable[None]]) -> Run:
    """``r2d2voice run --duplex DUPLEX``; once it is ready, ``await script(db)`` (which talks
    into the microphone), then SIGTERM. Returns what the database and the server saw."""
    db = tmp_path / "conversation.db"
    events: list[dict[str, Any]] = []
    config = BackendConfig(reply_seconds=REPLY_SECONDS, realtime_factor=20,
                           observer=lambda _sid, event: events.append(event))
    notify = Notifications()
    env = {k: v for k, v in rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(HOME=str(tmp_path), NOTIFY_SOCKET="@" + notify.name,
               R2D2_VAD_SILENCE_MS=str(VAD_SILENCE_MS))
    log = tmp_path / "run.log"
    with open(log, "wb") as stderr:
        async with trio.open_nursery() as nursery:
            await nursery.start(notify.serve)
            port = await nursery.start(serve_local, "127.0.0.1", 0, config)
            argv = [sys.executable, "-m", "r2d2voice", "--log-level", "DEBUG", "run",
                    "--input-device", "pulse", "--output-device", "pulse", "--duplex", duplex,
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


def test_the_rig_leaks_between_the_vad_threshold_and_the_barge_in_level(leaky_room):
    assert VAD_DBFS + 4 < leaky_room < BARGE_IN_DBFS - 4


async def test_half_duplex_loud_speech_barges_in_and_the_leak_does_not(
    pulse_rig, leaky_room, tmp_path
):
    hello = _trimmed(HELLO, tmp_path, HELLO_UNTIL_S)
    loud = _trimmed(QUESTION, tmp_path, QUESTION_UNTIL_S, gain_dbfs=LOUD_DBFS)

    async def script(db: Path) -> None:
        await _play(pulse_rig, hello)
        await _until(db, "assistant", 1)
        # The reply is in (streamed 20x faster than real time) and playing: talk over it.
        await trio.sleep(0.5)
        await _play(pulse_rig, loud)
        await _until(db, "assistant", 2)
        # The second reply plays to the end through the leak, and its echo tail passes.
        await trio.sleep(REPLY_SECONDS + AFTER_REPLY)

    run = await converse(pulse_rig, tmp_path, "half", script)

    # No turn made of echo: the user spoke twice, the robot answered twice.
    assert [m["role"] for m in run.messages] == ["user", "assistant"] * 2, run.describe()
    first, second = run.of_role("assistant")
    assert first["interrupted"] == 1, run.describe()  # the loud speech barged in ...
    assert 300 < first["played_ms"] < REPLY_SECONDS * 1000, run.describe()  # ... mid-reply
    assert second["interrupted"] == 0, run.describe()  # the leak did not
    assert len(run.client_events("conversation.item.truncate")) == 1
    assert run.stats["interruptions"] == 1, run.describe()
    # While the second reply played the mic was held back: ~2.3 s of 20 ms frames never sent.
    assert run.stats["frames_gated"] >= 0.9 * (REPLY_SECONDS + 0.3) / 0.02, run.describe()


async def test_full_duplex_the_leak_makes_the_robot_interrupt_itself(
    pulse_rig, leaky_room, tmp_path
):
    async def script(db: Path) -> None:
        await _play(pulse_rig, _trimmed(HELLO, tmp_path, HELLO_UNTIL_S))
        await _until(db, "user", 2)  # the robot's own beeps, heard back, make a turn

    run = await converse(pulse_rig, tmp_path, "full", script)

    assert [m["role"] for m in run.messages[:2]] == ["user", "assistant"], run.describe()
    first = run.of_role("assistant")[0]
    assert first["interrupted"] == 1, run.describe()
    assert first["played_ms"] < 1000, run.describe()  # cut off by its own first beeps
    assert run.client_events("conversation.item.truncate")
    assert len(run.of_role("user")) >= 2, run.describe()  # the robot's beeps became turns
    assert run.stats["frames_gated"] == 0
