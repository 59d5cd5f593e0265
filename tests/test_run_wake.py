"""Wake-word listening end to end: ``run --backend local --listen wake`` on the PulseAudio rig
(a subprocess with systemd's notify socket bound here), woken by ``r2d2voice wake``; and
``replay --listen wake`` of espeak-ng speech with and without "hey mycroft".

The in-process behaviour (no connection while waiting, the pre-roll, idle close, two wakes,
hanging up) is tests/test_listening.py's, on the MockClock; this file proves the wiring: the
control socket reaches the listener, STATUS= follows it, the earcons reach a real speaker and
nothing else, SIGTERM while waiting is a clean stop, and the replay summary and exit codes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from prometheus_client.parser import text_string_to_metric_families
from pulse import PulseRig
from support import (
    RATE,
    SCRUBBED_PREFIXES,
    NotifyListener,
    clean_env,
    espeak_pcm,
    free_port,
    silence,
)

from r2d2voice.audio import earcons

pytestmark = pytest.mark.pulse

WAITING = "waiting for 'hey mycroft'"
IDLE_S = "1"  # R2D2_CONVERSATION_IDLE_S: the conversation closes 1 s after the reply
#: a turn ends after 200 ms of silence (the default 500 ms only makes the tests slower)
QUICK_TURNS = {"R2D2_VAD_SILENCE_MS": "200"}
REPLY_PEAK_DBFS = -12.0  # the local backend's beeps (r2d2voice.audio.beeps.PEAK_DBFS)
REPLY_SECONDS = 1.0  # the local backend's reply length
RECORD_RATE = 48000  # the rig's speaker.monitor


def write_speech(text: str, path: Path, *, lead_s: float = 0.0) -> Path:
    """espeak-ng speech as a 24 kHz WAV, after ``lead_s`` of silence (a replay adds the
    silence that closes the last turn)."""
    work = path.parent / f"{path.stem}.espeak"
    work.mkdir()
    pcm = np.concatenate([silence(lead_s), espeak_pcm(text, work)])
    soundfile.write(path, pcm, RATE, subtype="PCM_16")
    return path


@dataclass
class WokenRun:
    """What one ``run --listen wake`` did: woken once, asked one thing, stopped by SIGTERM."""

    code: int
    lines: list[str]  # what systemd was told, in order
    at_wake: int  # how many lines had come when `r2d2voice wake` was run
    at_sigterm: int
    woke: subprocess.CompletedProcess[str]
    log: str
    db: Path
    speaker: np.ndarray  # what the rig's speaker played, float, RECORD_RATE
    metrics: str  # what R2D2_METRICS served once the conversation was over

    def statuses(self, lines: list[str] | None = None) -> list[str]:
        return [line.removeprefix("STATUS=") for line in (self.lines if lines is None else lines)
                if line.startswith("STATUS=")]


@contextlib.contextmanager
def running(workdir: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``run --backend local --listen wake`` (output to ``workdir/run.log``); killed if it is
    left running."""
    log = workdir / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "r2d2voice", "run", "--backend", "local", "--listen", "wake",
             "--db", str(workdir / "c.db")],
            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(proc: subprocess.Popen[bytes], what: str, predicate: Callable[[], bool],
             log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run exited with {proc.returncode} before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:g} s:\n{log.read_text()}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def woken(pulse_rig: PulseRig, tmp_path_factory: pytest.TempPathFactory) -> WokenRun:
    """Start ``run --listen wake``, wake it with ``r2d2voice wake``, say a request into the
    microphone, let R2 answer and the conversation close, SIGTERM it while it waits again."""
    workdir = tmp_path_factory.mktemp("wake")
    request = write_speech("what time is it", workdir / "request.wav", lead_s=0.3)
    notify = NotifyListener()
    port = free_port()
    env = {k: v for k, v in pulse_rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(NOTIFY_SOCKET=notify.path, RUNTIME_DIRECTORY=str(workdir / "rt"),
               R2D2_INPUT_DEVICE="pulse", R2D2_OUTPUT_DEVICE="pulse",
               R2D2_CONVERSATION_IDLE_S=IDLE_S, R2D2_METRICS=f"127.0.0.1:{port}",
               **QUICK_TURNS)
    log = workdir / "run.log"
    try:
        with running(workdir, env) as proc, \
                pulse_rig.record(workdir / "speaker.wav"):
            wait_for(proc, "READY=1", lambda: "READY=1" in notify.lines(), log)
            at_wake = len(notify.lines())
            woke = subprocess.run([sys.executable, "-m", "r2d2voice", "wake"], env=env,
                                  cwd=workdir, capture_output=True, text=True, timeout=20)
            wait_for(proc, "a conversation that listens",
                     lambda: "in conversation (listening)" in notify.statuses(), log)
            pulse_rig.play(request)  # returns once it has all been played
            wait_for(proc, "the reply and the conversation's end", lambda: (
                "in conversation (speaking)" in notify.statuses()
                and notify.statuses()[-1] == WAITING), log)
            time.sleep(0.5)  # the closing whistle through the device's latency
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                metrics = page.read().decode()
            at_sigterm = len(notify.lines())
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"run did not stop after SIGTERM:\n{log.read_text()}")
    finally:
        notify.close()
    recorded, rate = soundfile.read(workdir / "speaker.wav", dtype="float32")
    assert rate == RECORD_RATE
    return WokenRun(code, notify.lines(), at_wake, at_sigterm, woke, log.read_text(),
                    workdir / "c.db", recorded, metrics)


def matches(recording: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The normalised cross-correlation of ``template`` with ``recording`` at every offset
    (1: the same waveform there, at any level; silence scores ~0)."""
    n = len(recording) + len(template)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(template, size)),
                        size)[: len(recording) - len(template) + 1]
    energy = np.concatenate([[0.0], np.cumsum(np.square(recording, dtype=np.float64))])
    window = energy[len(template):] - energy[: len(recording) - len(template) + 1]
    floor = 1e-3 * float(np.sum(np.square(template, dtype=np.float64)))
    return corr / (np.linalg.norm(template) * np.sqrt(np.maximum(window, floor)))


def pieces_heard(recording: np.ndarray, earcon: np.ndarray, piece_s: float = 0.03) -> int:
    """How many sounding 30 ms pieces of ``earcon`` were played in ``recording``, each
    where the earcon's place says (within 0.1 s: a busy machine can stall the sound server
    for a few ms and split the earcon, its pieces are still heard whole)."""
    played = soxr.resample(earcon.astype(np.float32) / 32768, RATE, RECORD_RATE)
    size = round(piece_s * RECORD_RATE)
    starts = []  # where each piece found puts the earcon's start
    for start in range(0, len(played) - size + 1, size):
        piece = played[start:start + size]
        if np.sqrt(np.mean(np.square(piece))) < 1e-3:
            continue  # the gap between the earcon's parts
        score = matches(recording, piece)
        if score.max() > 0.95:
            starts.append(int(score.argmax()) - start)
    if not starts:
        return 0
    middle = np.median(starts)
    return sum(abs(at - middle) <= 0.1 * RECORD_RATE for at in starts)


def test_r2d2voice_wake_starts_a_conversation_that_is_answered_and_stored(woken: WokenRun):
    assert woken.woke.returncode == 0, woken.woke.stderr
    assert woken.woke.stdout.startswith("woke the r2d2voice run listening on "), woken.woke
    with sqlite3.connect(woken.db) as db:
        sessions = db.execute("SELECT id, metadata FROM sessions").fetchall()
        rows = db.execute("SELECT role, text FROM messages ORDER BY session_id, seq").fetchall()
    assert len(sessions) == 1, woken.log
    metadata = json.loads(sessions[0][1])
    assert (metadata["listen"], metadata["wake_source"], metadata["command"]) == (
        "wake", "external", "run")
    assert metadata["conversation_end"] == "idle"
    assert [role for role, _ in rows] == ["user", "assistant"], rows
    assert rows[0][1].startswith("(speech, ") and "R2 answers in beeps" in rows[1][1]


def test_earcons_are_heard_on_the_speaker_around_the_reply(woken: WokenRun):
    heard = woken.speaker
    loud = np.flatnonzero(np.abs(heard) > 10 ** ((REPLY_PEAK_DBFS - 3) / 20))
    assert len(loud), "no reply on the speaker"  # louder than any earcon
    # most of the chirp before the reply, of the whistle after it
    assert pieces_heard(heard[: loud[0]], earcons.chirp()) >= 5  # of 7 (beep, rising whistle)
    assert pieces_heard(heard[loud[-1]:], earcons.whistle()) >= 9  # of 13 (whistle, boop)
    # and only the reply is stored: no earcon became a message (see the test above), and the
    # reply WAV of a replay skips them (test_replay_hears_the_wake_word_and_answers)


def test_status_says_waiting_then_in_conversation_then_waiting(woken: WokenRun):
    before = woken.statuses(woken.lines[: woken.at_wake])
    during = woken.statuses(woken.lines[woken.at_wake: woken.at_sigterm])
    assert before and set(before) == {WAITING}, before
    assert "READY=1" in woken.lines[: woken.at_wake]
    assert during[0] == "in conversation (connecting)", during
    assert {"in conversation (listening)", "in conversation (speaking)"} <= set(during)
    assert during[-1] == WAITING
    assert all(s.startswith("in conversation (") for s in during[:-1]), during


def test_metrics_count_the_wake_and_the_spoken_turn(woken: WokenRun):
    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in text_string_to_metric_families(woken.metrics) for x in f.samples}
    assert got[("r2d2voice_wakes_total", (("source", "external"),))] == 1
    assert ("r2d2voice_wakes_total", (("source", "word"),)) not in got
    assert got[("r2d2voice_turns_total", ())] == 1
    assert got[("r2d2voice_responses_total", (("status", "completed"),))] == 1
    assert got[("r2d2voice_reply_latency_seconds_count", ())] == 1
    assert got[("r2d2voice_connected", ())] == 0  # the conversation closed when idle
    assert not [k for k in got if k[0] == "r2d2voice_reconnects_total"]
    assert got[("r2d2voice_cost_usd_total", ())] == 0  # the local backend is not billed
    assert got[("r2d2voice_capture_dropped_frames_total", ())] == 0
    assert got[("r2d2voice_playback_underruns_total", ())] == 0
    assert got[("r2d2voice_device_present", (("kind", "input"),))] == 1
    assert got[("r2d2voice_device_present", (("kind", "output"),))] == 1


def test_sigterm_while_waiting_stops_cleanly(woken: WokenRun):
    assert woken.code == 0, woken.log
    assert woken.lines.count("STOPPING=1") == 1
    assert woken.lines.index("STOPPING=1") >= woken.at_sigterm
    assert "stopped after 1 conversation" in woken.log
    assert "Traceback" not in woken.log


def test_a_wake_while_the_microphone_is_missing_says_so_on_both_sides(
        pulse_rig: PulseRig, tmp_path: Path):
    """``r2d2voice wake`` to a run waiting for its microphone: nothing can happen, and both the
    asker (exit 1, one line) and the run's log say why."""
    notify = NotifyListener()
    env = {k: v for k, v in pulse_rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(NOTIFY_SOCKET=notify.path, RUNTIME_DIRECTORY=str(tmp_path / "rt"),
               R2D2_INPUT_DEVICE="no such microphone", R2D2_OUTPUT_DEVICE="pulse")
    log = tmp_path / "run.log"
    try:
        with running(tmp_path, env) as proc:
            wait_for(proc, "READY=1", lambda: "READY=1" in notify.lines(), log)
            woke = subprocess.run([sys.executable, "-m", "r2d2voice", "wake"], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=20)
            wait_for(proc, "the run saying so", lambda: "wake: ignored" in log.read_text(), log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    finally:
        notify.close()
    assert woke.returncode == 1, woke
    (line,) = woke.stderr.strip().splitlines()
    assert line.startswith("r2d2voice: error:") and "cannot be woken now" in line
    assert "waiting for microphone 'no such microphone'" in line
    said = [x for x in log.read_text().splitlines() if "wake: ignored" in x]
    assert len(said) == 1 and "waiting for microphone 'no such microphone'" in said[0]
    assert "Traceback" not in log.read_text()


@dataclass
class Replay:
    res: subprocess.CompletedProcess[str]
    speech: Path
    db: Path
    reply: Path


@pytest.fixture(scope="module")
def replays(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Replay]:
    """``replay --listen wake`` of a request and of ordinary speech, side by side, each with
    a fleet server that refuses connections."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        fleet = f"postgresql://r2d2@127.0.0.1:{probe.getsockname()[1]}/fleet"
    texts = {"ask": "hey mycroft, what time is it",
             "talk": "the garden looks lovely in the morning sun"}
    procs = {}
    for name, text in texts.items():
        work = tmp_path_factory.mktemp(name)
        speech = write_speech(text, work / f"{name}.wav")
        proc = subprocess.Popen(
            [sys.executable, "-m", "r2d2voice", "replay", str(speech), "--listen", "wake",
             "--backend", "local", "--db", str(work / "c.db")],
            cwd=work, env=clean_env(HOME=str(work), R2D2_SHIP_URL=fleet, **QUICK_TURNS), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs[name] = (proc, speech, work)
    done = {}
    for name, (proc, speech, work) in procs.items():
        out, err = proc.communicate(timeout=60)
        done[name] = Replay(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                            speech, work / "c.db", work / f"{name}.reply.wav")
    return done


def test_replay_hears_the_wake_word_and_answers(replays: dict[str, Replay]):
    ask = replays["ask"]
    assert ask.res.returncode == 0, ask.res.stderr
    summary = ask.res.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 conversation (woken at "), ask.res.stdout
    assert "1 turn answered, 1.0 s of reply audio in " in summary
    assert "no wake word" not in ask.res.stderr
    # earcons were played (R2D2_EARCONS defaults to on) but the reply WAV holds the reply only
    reply, rate = soundfile.read(ask.reply, dtype="int16")
    assert len(reply) / rate == pytest.approx(REPLY_SECONDS, abs=0.03)
    with sqlite3.connect(ask.db) as db:
        (metadata,), = db.execute("SELECT metadata FROM sessions").fetchall()
        roles = [r for r, in db.execute("SELECT role FROM messages ORDER BY seq")]
    assert json.loads(metadata)["wake_source"] == "word"
    assert roles == ["user", "assistant"]


def test_replay_of_ordinary_speech_sends_nothing(replays: dict[str, Replay]):
    talk = replays["talk"]
    assert talk.res.returncode == 0, talk.res.stderr
    assert talk.res.stdout.strip().splitlines()[-1].startswith(
        "0 conversations, 0 turns answered, 0.0 s of reply audio"), talk.res.stdout
    assert (f"no wake word heard in {talk.speech} (R2D2_WAKE_WORD=hey_mycroft): nothing was "
            "sent" in talk.res.stderr)
    if talk.db.exists():
        with sqlite3.connect(talk.db) as db:
            assert db.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


def test_one_shipper_serves_a_whole_woken_replay(replays: dict[str, Replay]):
    """Not one per conversation: it tries while nothing was heard, and the end of the run
    (not of each conversation) is its last try."""
    for replay in replays.values():
        assert replay.res.returncode == 0, replay.res.stderr  # the fleet being down is no error
        assert "unavailable while connecting" in replay.res.stderr
        assert replay.res.stderr.count("fleet: not shipped this time") == 1, replay.res.stderr
