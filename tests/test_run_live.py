"""``r2d2voice run`` end to end: a real microphone and speaker (the private PulseAudio rig of
tests/pulse.py), the embedded local backend, and systemd's notify protocol on a test socket.

The service runs as a subprocess with the rig's environment, ``NOTIFY_SOCKET`` pointing at an
``AF_UNIX`` datagram socket bound here and ``WATCHDOG_USEC=1000000`` (a ping every 0.5 s). The
test plays a speech sample into the rig's ``mic`` sink (the service's microphone is
``mic.monitor``) and records ``speaker.monitor``; the local backend answers every turn with
1 s of R2 beeps peaking at -12 dBFS.

Devices are ALSA's ``pulse`` device, which PortAudio opens at its default rate, 44.1 kHz, in
front of the rig's 48 kHz sinks: the run path resamples 44.1 kHz <-> 24 kHz both ways.
"""

from __future__ import annotations

import contextlib
import re
import signal
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
from pulse import REPO, PulseRig, open_pulse_rig
from support import SCRUBBED_PREFIXES, NotifyListener, free_port

pytestmark = pytest.mark.pulse

HELLO = REPO / "data" / "samples" / "hello.wav"  # 16 kHz; 0.3 s silence, speech, 0.5 s silence
#: the sample up to the end of "Hello R2." (a 0.3 s pause, then "Can you hear me?"), then
#: SPEECH_TAIL_S of silence: the whole of what is said takes time to play into the rig
SPEECH_CUT_S = 1.15
SPEECH_TAIL_S = 0.1
WATCHDOG_USEC = 1_000_000
REPLY_PEAK_DBFS = -12.0  # r2d2voice.audio.beeps.PEAK_DBFS
REPLY_SECONDS = 1.0
SILENCE_DBFS = -60.0


# -- the notify socket ----------------------------------------------------------------------------


# -- the service ----------------------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()``; fail with the service's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"r2d2voice run exited with {self.proc.returncode} before {what}:\n"
                            f"{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:g} s; notify: {self.notify.messages}\n"
                            f"{self.log()}")
            time.sleep(0.02)

    def wait_ready(self) -> None:
        self.wait_for("READY=1", lambda: "READY=1" in self.notify.lines(), timeout=20)

    def terminate(self) -> int:
        """SIGTERM; the exit code once the service has stopped by itself."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"r2d2voice run did not stop by itself after SIGTERM:\n{self.log()}")


def service_env(rig: PulseRig, notify: NotifyListener, **extra: str) -> dict[str, str]:
    """The rig's environment without any r2d2voice/Realtime settings of the caller's, plus the
    systemd variables."""
    env = {k: v for k, v in rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(WATCHDOG_USEC),
               R2D2_VAD_SILENCE_MS="200", **extra)  # a turn ends 200 ms after the speech
    return env


@contextlib.contextmanager
def run_service(rig: PulseRig, workdir: Path, notify: NotifyListener, args: list[str],
                **env: str) -> Iterator[Service]:
    """``python -m r2d2voice run --backend local --db workdir/c.db ARGS``; killed if left running.

    The working directory is ``workdir`` and HOME is the rig's: no ``.env`` file is read.
    """
    log_path = workdir / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "r2d2voice", "run", "--backend", "local",
             "--db", str(workdir / "c.db"), *args],
            env=service_env(rig, notify, **env), cwd=workdir,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield Service(proc, notify, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- audio analysis -------------------------------------------------------------------------------


def _dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20 * np.log10(max(rms, 1e-10))


def _active_windows(x: np.ndarray, rate: int, window_s: float = 0.02) -> np.ndarray:
    """Indices of the 20 ms windows louder than -40 dBFS."""
    n = int(rate * window_s)
    windows = x[: len(x) // n * n].reshape(-1, n)
    rms = np.sqrt(np.mean(np.square(windows, dtype=np.float64), axis=1))
    return np.flatnonzero(rms > 0.01)


def _tonality(x: np.ndarray, rate: int, window_s: float = 0.02) -> float:
    """Median, over the active 20 ms windows, of the energy share within +-15% of the strongest
    frequency: about 1 for R2's beeps and whistles (pure tones), well under 0.6 for speech
    (harmonics spread over the spectrum)."""
    n = int(rate * window_s)
    hz = np.fft.rfftfreq(4 * n, 1 / rate)
    shares = []
    for i in _active_windows(x, rate, window_s):
        w = x[i * n : (i + 1) * n].astype(np.float64) * np.hanning(n)
        power = np.abs(np.fft.rfft(w, n=4 * n)) ** 2
        peak = hz[int(np.argmax(power))]
        shares.append(power[(hz > 0.85 * peak) & (hz < 1.15 * peak)].sum() / power.sum())
    return float(np.median(shares))


# -- one conversation, shared by the tests below --------------------------------------------------


@dataclass
class Conversation:
    code: int
    lines: list[str]  # what systemd was told, in order
    lines_before_sigterm: int
    log: str
    db: Path
    speaker: Path
    speech: Path  # what was played into the microphone
    metrics: str  # what R2D2_METRICS served once the reply had played

    def index(self, line: str) -> int:
        return self.lines.index(line)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the user says into the microphone: "Hello R2." as a 16 kHz WAV."""
    pcm, rate = soundfile.read(HELLO, dtype="int16")
    short = np.concatenate([pcm[: round(SPEECH_CUT_S * rate)],
                            np.zeros(round(SPEECH_TAIL_S * rate), np.int16)])
    path = tmp_path_factory.mktemp("speech") / "hello_r2.wav"
    soundfile.write(path, short, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def conversation(pulse_rig: PulseRig, tmp_path_factory: pytest.TempPathFactory,
                 speech: Path) -> Conversation:
    """Start ``run``, say hello into the microphone, let R2 answer, SIGTERM it.

    The input device comes from the environment (R2D2_INPUT_DEVICE), the output from the flag.
    """
    workdir = tmp_path_factory.mktemp("run")
    speaker = workdir / "speaker.wav"
    port = free_port()
    with NotifyListener() as notify, run_service(
        pulse_rig, workdir, notify, ["--output-device", "pulse"], R2D2_INPUT_DEVICE="pulse",
        R2D2_METRICS=f"127.0.0.1:{port}",
    ) as service:
        service.wait_ready()
        with pulse_rig.record(speaker):
            pulse_rig.play(speech)  # returns when the whole sample has been played

            def listening_after_reply() -> bool:
                statuses = notify.statuses()
                return "speaking" in statuses and statuses[-1] == "listening"

            service.wait_for("the reply to play out", listening_after_reply, timeout=15)
            time.sleep(0.5)  # the device's own latency, then some silence
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            metrics = page.read().decode()
        before = len(notify.lines())
        code = service.terminate()
    return Conversation(code, notify.lines(), before, service.log(), workdir / "c.db", speaker,
                        speech, metrics)


def test_sigterm_stops_cleanly_and_says_so(conversation):
    assert conversation.code == 0, conversation.log
    assert conversation.lines.count("STOPPING=1") == 1, conversation.lines
    # sent on the way out, after the signal, never before
    assert conversation.index("STOPPING=1") >= conversation.lines_before_sigterm
    assert "Traceback" not in conversation.log
    assert "SIGTERM: finishing up" in conversation.log


def test_ready_and_status_follow_the_conversation(conversation):
    lines = conversation.lines
    assert lines.count("READY=1") == 1
    ready = lines.index("READY=1")
    before = [line[len("STATUS="):] for line in lines[:ready] if line.startswith("STATUS=")]
    after = [line[len("STATUS="):] for line in lines[ready:] if line.startswith("STATUS=")]
    assert before[0] == "connecting"
    assert before[-1] == "listening"  # what systemctl status shows once the service is active
    # Then the user speaks; R2 thinks, then speaks (in that order).
    order = ["listening (you are speaking)", "thinking", "speaking"]
    positions = [after.index(s) for s in order]
    assert positions == sorted(positions), after


def test_status_returns_to_listening_after_the_reply(conversation):
    statuses = [line for line in conversation.lines[: conversation.lines_before_sigterm]
                if line.startswith("STATUS=")]
    assert statuses[-1] == "STATUS=listening", statuses


def test_watchdog_pings_while_the_microphone_delivers(conversation):
    # The cadence and the "no frames, no pings" rule are tested on a mock clock
    # (test_notify.py); here: WATCHDOG_USEC is honoured and pings go on all through the run.
    lines = conversation.lines[: conversation.lines_before_sigterm]
    ready, speaking = lines.index("READY=1"), lines.index("STATUS=speaking")
    pings = [i for i, line in enumerate(lines) if line == "WATCHDOG=1"]
    assert any(ready < i < speaking for i in pings), lines  # while the user spoke
    assert any(i > speaking for i in pings), lines  # through the reply, and after


def test_both_turns_are_stored_with_item_ids(conversation):
    with contextlib.closing(sqlite3.connect(conversation.db)) as db:
        messages = db.execute(
            "SELECT role, text, item_id, response_id, created_at, session_id FROM messages"
            " ORDER BY created_at, id"
        ).fetchall()
        sessions = db.execute(
            "SELECT id, backend, ended_at, started_at, metadata FROM sessions"
        ).fetchall()
    assert [m[0] for m in messages] == ["user", "assistant"], messages
    user, reply = messages
    assert user[2] and reply[2] and user[2] != reply[2]  # item ids from the service
    assert reply[3]  # the response id
    assert "R2 answers in beeps" in reply[1]
    [(session_id, backend, ended_at, started_at, metadata)] = sessions
    assert user[5] == reply[5] == session_id
    assert backend == "local"
    assert ended_at is not None and ended_at >= started_at  # SIGTERM closed the session
    assert '"input": "pulse"' in metadata and '"output": "pulse"' in metadata
    # The transcripts also go to the journal.
    assert f"you: {user[1]}" in conversation.log and f"r2: {reply[1]}" in conversation.log


def test_the_reply_is_heard_on_the_speaker_after_the_speech(conversation):
    pcm, rate = soundfile.read(conversation.speaker, dtype="float64")
    active = _active_windows(pcm, rate)
    assert len(active), "the speaker stayed silent"
    start, end = active[0] * 0.02, (active[-1] + 1) * 0.02
    speech, _ = soundfile.read(conversation.speech, dtype="float64")
    speech_end = len(speech) / 16000 - SPEECH_TAIL_S  # the sample ends with silence
    # Nothing on the speaker while the user spoke (no echo of the microphone), then the reply.
    assert start > speech_end
    assert _dbfs(pcm[: int((start - 0.05) * rate)]) < SILENCE_DBFS
    # All of the reply, once (longer only if a loaded machine made playback run dry mid-way).
    assert REPLY_SECONDS - 0.15 < end - start < 3 * REPLY_SECONDS
    reply = pcm[int(start * rate) : int(end * rate)]
    peak_dbfs = 20 * np.log10(np.abs(reply).max())
    assert peak_dbfs == pytest.approx(REPLY_PEAK_DBFS, abs=1.5)
    assert _dbfs(reply) > -30
    # Beeps, not speech leaking through: a tonal spectrum, unlike the sample that was spoken.
    assert _tonality(reply, rate) > 0.8
    assert _tonality(speech, 16000) < 0.6


def test_devices_run_at_44100_hz_and_are_resampled(conversation):
    # ALSA's pulse device opens at its default 44.1 kHz (the rig's sinks run at 48 kHz): capture
    # and playback go through the 44.1 kHz <-> 24 kHz resamplers, and the reply above still comes
    # out at its level and length.
    assert re.search(r"capturing from \d+ 'pulse' at 44100 Hz", conversation.log)
    assert re.search(r"playing to \d+ 'pulse' at 44100 Hz", conversation.log)
    assert "ready: listening on pulse, speaking on pulse" in conversation.log


# -- devices that are missing, ambiguous, or come and go -----------------------------------------


def _pings_between(lines: list[str], start: int, end: int) -> int:
    return sum(line == "WATCHDOG=1" for line in lines[start:end])


def test_a_missing_device_is_waited_for_and_sigterm_still_stops_the_run(pulse_rig, tmp_path):
    # A name that matches nothing is not a configuration error: a USB mic may enumerate late.
    with NotifyListener() as notify, run_service(
        pulse_rig, tmp_path, notify, ["--input-device", "no such mic"],
        R2D2_OUTPUT_DEVICE="no such speaker",
    ) as service:
        waiting = "waiting for microphone 'no such mic' and speaker 'no such speaker'"
        service.wait_ready()  # the service is up and doing what it should: waiting
        service.wait_for("the waiting status", lambda: waiting in notify.statuses(), timeout=10)
        ready = notify.lines().index("READY=1")
        service.wait_for("watchdog pings while waiting",
                         lambda: _pings_between(notify.lines(), ready, len(notify.lines())) >= 3,
                         timeout=10)
        code = service.terminate()
    log = service.log()
    assert code == 0, log
    assert notify.statuses()[-1] == waiting
    assert "listening" not in notify.statuses()  # it never claimed to hear anything
    # said once each (not at every look), with the devices there are
    [mic] = [line for line in log.splitlines() if "microphone 'no such mic' unavailable" in line]
    assert re.search(r"inputs: \d+ 'pulse', \d+ 'default'", mic)
    assert log.count("speaker 'no such speaker' unavailable") == 1
    assert "Traceback" not in log


def test_an_ambiguous_device_is_a_config_error(pulse_rig, tmp_path):
    with NotifyListener() as notify:
        res = subprocess.run(
            [sys.executable, "-m", "r2d2voice", "run", "--backend", "local",
             "--db", str(tmp_path / "c.db"), "--input-device", "u"],  # "pulse", "default"
            env=service_env(pulse_rig, notify), cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 3, res.stderr  # systemd: RestartPreventExitStatus=3
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("r2d2voice: error: input device 'u' is ambiguous: matches ")
    assert re.search(r"\d+ 'pulse'", line) and re.search(r"\d+ 'default'", line)
    assert not any(msg.startswith("READY=1") for msg in notify.messages)


@dataclass
class Comeback:
    """A run that started before the sound server and lived through its restart."""

    code: int
    lines: list[str]
    marks: dict[str, int]  # how many notify lines there were at each step
    log: str
    db: Path

    def statuses(self, start: str, end: str) -> list[str]:
        return [line[len("STATUS="):] for line in self.lines[self.marks[start]:self.marks[end]]
                if line.startswith("STATUS=")]


WAITING = "waiting for the default microphone and the default speaker"


@pytest.fixture(scope="module")
def comeback(tmp_path_factory: pytest.TempPathFactory, speech: Path) -> Iterator[Comeback]:
    """``run`` on the default devices of a rig of its own: started while no sound server runs,
    the server appears, a turn; the server is killed and started again, another turn; SIGTERM.
    (Its own rig: the session's ``pulse_rig`` must not die under other tests.)"""
    workdir = tmp_path_factory.mktemp("comeback")
    with open_pulse_rig() as first:
        first.stop()  # no sound server yet: the devices do not exist when `run` starts
        rigs: list[PulseRig] = []
        marks: dict[str, int] = {}
        try:
            with NotifyListener() as notify, run_service(first, workdir, notify, []) as service:

                def mark(name: str) -> None:
                    marks[name] = len(notify.lines())

                def status_is(text: str) -> Callable[[], bool]:
                    return lambda: bool(notify.statuses()) and notify.statuses()[-1] == text

                def waiting_for_the_microphone() -> bool:
                    # (and for the speaker too, if it was playing when the server died)
                    return any(line.startswith("STATUS=waiting for the default microphone")
                               for line in notify.lines()[marks["answered"]:])

                def answered(turns: int) -> Callable[[], bool]:
                    return lambda: _stored(workdir / "c.db").count("assistant") >= turns

                service.wait_ready()
                service.wait_for("the waiting status", status_is(WAITING), timeout=10)
                mark("waiting")
                rigs.append(PulseRig(first.root))  # the sound server appears
                service.wait_for("the devices", status_is("listening"), timeout=15)
                mark("found")
                rigs[-1].play(speech)
                service.wait_for("the first reply", answered(1), timeout=15)
                mark("answered")
                rigs.pop().stop()  # the sound server dies mid-run
                service.wait_for("waiting again", waiting_for_the_microphone, timeout=10)
                mark("lost")
                rigs.append(PulseRig(first.root))  # ... and comes back
                service.wait_for("the devices again", status_is("listening"), timeout=15)
                mark("back")
                rigs[-1].play(speech)
                service.wait_for("the second reply", answered(2), timeout=15)
                mark("answered again")
                code = service.terminate()
                mark("end")
        finally:
            for rig in rigs:
                rig.stop()
        yield Comeback(code, notify.lines(), marks, service.log(), workdir / "c.db")


def _stored(db: Path) -> list[str]:
    """The roles of the stored messages, in order ([] before the schema exists)."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            return [r for (r,) in con.execute("SELECT role FROM messages ORDER BY created_at, id")]
    except sqlite3.OperationalError:
        return []


def test_run_started_before_the_sound_server_waits_then_answers(comeback):
    assert comeback.code == 0, comeback.log
    # READY=1 came while waiting for the devices: the service was up and doing what it should
    assert comeback.lines.index("READY=1") < comeback.marks["waiting"]
    assert "listening (you are speaking)" in comeback.statuses("found", "answered")
    assert "no default input device" in comeback.log  # why it waited, in the log
    assert "Traceback" not in comeback.log


def test_the_sound_server_restarting_mid_run_is_survived(comeback):
    # the same run, the same database: the second turn is answered after the restart
    assert _stored(comeback.db) == ["user", "assistant", "user", "assistant"], comeback.log
    assert "listening (you are speaking)" in comeback.statuses("back", "answered again")
    assert re.search(r"the default microphone unavailable \(.*\): waiting for it", comeback.log)
    assert "the default microphone is back" in comeback.log
    with contextlib.closing(sqlite3.connect(comeback.db)) as con:
        [(sessions,)] = con.execute("SELECT count(*) FROM sessions").fetchall()
    assert sessions == 1  # the connection survived the device's absence


def test_the_watchdog_is_fed_while_deliberately_waiting(comeback):
    lines, marks = comeback.lines, comeback.marks
    # WATCHDOG_USEC=1 s: a ping every 0.5 s while the run waits for its devices
    assert _pings_between(lines, marks["waiting"], marks["found"]) >= 2, lines
    assert _pings_between(lines, marks["lost"], marks["back"]) >= 2, lines


def test_metrics_after_a_spoken_turn(conversation):
    from prometheus_client.parser import text_string_to_metric_families

    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in text_string_to_metric_families(conversation.metrics) for x in f.samples}
    assert got[("r2d2voice_turns_total", ())] == 1
    assert got[("r2d2voice_responses_total", (("status", "completed"),))] == 1
    assert got[("r2d2voice_reply_latency_seconds_count", ())] == 1
    assert 0 < got[("r2d2voice_reply_latency_seconds_sum", ())] < 5
    assert got[("r2d2voice_connected", ())] == 1
    assert got[("r2d2voice_device_present", (("kind", "input"),))] == 1
    assert got[("r2d2voice_device_present", (("kind", "output"),))] == 1
    assert got[("r2d2voice_cost_usd_total", ())] == 0  # the local backend is not billed
    assert got[("r2d2voice_capture_dropped_frames_total", ())] == 0
    assert got[("r2d2voice_store_records_waiting", ())] == 0
