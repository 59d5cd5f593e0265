"""Echo: the canceller in the simulated room over a sweep of echo levels, and its CPU in ``run``.

**Sweep** (offline, deterministic: ``tests/room.py``'s room and ``simulate``, the canceller
exactly as ``run`` drives it, on a simulated clock). For each echo level from -10 to +15 dB
relative to a person at a normal voice (-30 dBFS median frame), and for two kinds of reply (an
espeak-ng voice near full scale, and the local backend's R2 beeps):

- *self-triggers*: replies with nobody talking in which the service's VAD (server_vad defaults,
  as the local backend runs it) would have started a turn on what the canceller let through;
- *barge-in*: a person (another espeak-ng voice) starts talking over the reply at several
  moments; the time from their own speech onset to the service's VAD starting on the
  canceller's output (p50 / p90; "silent" adds the speaker's stop, one output block and the
  output latency: 40 ms);
- *words*: the share of the person's spoken 20 ms frames that reach the service at their own
  level (within 6 dB) from their onset on;
- *reduction*: the echo removed (microphone minus what is sent, median over the echo's frames
  after the first second).

**CPU** (``--cpu``, on a private PulseAudio rig): a bare duplex PortAudio pair (an input and an
output stream opened as ``run`` opens them, both running, callbacks doing nothing: the floor),
``run`` with ``R2D2_ECHO=aec`` and ``run`` with ``R2D2_ECHO=off``, side by side, while a person
(a recording played into the rig's microphone every few seconds) talks to the local backend and
each run plays its replies. User+sys CPU of each over the same window, as a ratio to the floor.

    .venv/bin/python bench/echo.py                 # the sweep, ~2 min
    .venv/bin/python bench/echo.py --cpu --window 30
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from room import echo_gain_for, frame_dbfs, person_at, simulate, to_int16  # noqa: E402
from support import espeak_pcm  # noqa: E402

from r2d2voice.audio.beeps import r2_reply  # noqa: E402
from r2d2voice.audio.echo import EchoCanceller, SpeakerTap, load_apm  # noqa: E402
from r2d2voice.audio.pcm import RATE  # noqa: E402
from r2d2voice.audio.vad import EnergyVad, SpeechStarted  # noqa: E402

DEVICE_RATE = 48000
LEVELS = tuple(int(x) for x in os.environ.get("ECHO_LEVELS", "-10,-5,0,5,10,13,15").split(","))
ONSETS = (0.8, 1.4, 2.0, 2.6)
ROBOT_SAYS = ("Hello there, I am R2. I can hear you quite well, and the weather today is "
              "sunny with a light breeze from the west, so we could go out for a walk.")
PERSON_SAYS = "wait what time is it now tell me the time please"
PERSON_VOICE = ("-v", "en+f3", "-p", "70")
#: the speaker falls silent one output block and the output latency after the service hears
STOP_S = 0.04


def vad() -> EnergyVad:
    return EnergyVad(RATE, threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)


def starts(x: np.ndarray) -> list[float]:
    return [e.onset_ms / 1000 for e in vad().feed(x) if isinstance(e, SpeechStarted)]


def voices(tmp: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    robot = espeak_pcm(ROBOT_SAYS, tmp, rate=DEVICE_RATE).astype(np.float64)
    beeps, _ = r2_reply(b"bench", 5.0)
    replies = {
        "voice": to_int16(robot / np.abs(robot).max() * 0.7),
        "beeps": to_int16(soxr.resample(beeps.astype(np.float32) / 32768, RATE, DEVICE_RATE)),
    }
    person = person_at(espeak_pcm(PERSON_SAYS, tmp, rate=DEVICE_RATE, voice=PERSON_VOICE),
                       DEVICE_RATE)
    return replies, person


def canceller() -> EchoCanceller:
    make = load_apm()
    if make is None:
        sys.exit("livekit is not installed: no canceller to measure")
    return EchoCanceller(make, SpeakerTap())


def barge_in(reply: np.ndarray, person: np.ndarray, gain: float, onset: float
             ) -> tuple[float | None, float]:
    """(seconds from the person's speech onset to the service hearing them, or None; the share
    of their frames that reached the service)."""
    alone24 = soxr.resample(person, DEVICE_RATE, RATE)
    own = starts(np.concatenate((np.zeros(int(onset * RATE), np.int16), to_int16(alone24))))
    spoken_at = own[0] if own else onset
    service, fed = vad(), [0]

    def hears(more: np.ndarray) -> bool:
        skip = max(0, int(onset * RATE) - fed[0])
        fed[0] += len(more)
        return any(isinstance(e, SpeechStarted) for e in service.feed(more[skip:]))

    played = simulate(canceller(), reply, rate=DEVICE_RATE, echo_gain=gain, person=person,
                      person_at=onset, stop_on=hears)
    heard = None if played.stopped_at is None else played.stopped_at - 0.01 - spoken_at
    alone = frame_dbfs(soxr.resample(played.person, DEVICE_RATE, RATE), RATE)
    out = frame_dbfs(played.out, RATE)
    n = min(len(alone), len(out))
    frames = np.arange(n) >= int(onset * 50)
    spoken = frames & (alone[:n] > -45)
    share = float(np.mean(out[:n][spoken] >= alone[:n][spoken] - 6)) if spoken.any() else 0.0
    return heard, share


def sweep(tmp: Path) -> None:
    replies, person = voices(tmp)
    print("echo dB | reply | self-triggers | heard p50/p90 s | silent p50/p90 s | words | "
          "reduction dB")
    for level in LEVELS:
        for kind, reply in replies.items():
            gain = echo_gain_for(reply, DEVICE_RATE, level)
            stage = canceller()
            alone = simulate(stage, reply, rate=DEVICE_RATE, echo_gain=gain)
            triggers = len(starts(alone.out))
            mic, out = frame_dbfs(alone.mic, RATE)[50:], frame_dbfs(alone.out, RATE)[50:]
            echoing = mic > -45
            reduction = float(np.median(mic[echoing] - out[echoing]))
            heard, shares = [], []
            for onset in ONSETS:
                h, share = barge_in(reply, person, gain, onset)
                heard.append(h)
                shares.append(share)
            got = sorted(h for h in heard if h is not None)
            missed = len(heard) - len(got)
            if got:
                p50, p90 = np.percentile(got, 50), np.percentile(got, 90)
                timing = f"{p50:.2f} / {p90:.2f}" + (f" ({missed} missed)" if missed else "")
                silent = f"{p50 + STOP_S:.2f} / {p90 + STOP_S:.2f}"
            else:
                timing, silent = "never", "-"
            print(f"{level:+7d} | {kind:5} | {triggers:13d} | {timing:15} | {silent:16} | "
                  f"{statistics.mean(shares):5.0%} | {reduction:5.1f}", flush=True)


# --------------------------------------------------------------------------- CPU on the rig

DUPLEX_FLOOR = """
import json, signal, sounddevice as sd
mic, out = sd.query_devices(kind="input"), sd.query_devices(kind="output")
rate = int(mic["default_samplerate"])
def listen(indata, frames, time, status):
    pass
def play(outdata, frames, time, status):
    outdata.fill(0)
streams = [sd.InputStream(device=mic["index"], samplerate=rate, blocksize=rate // 50,
                          channels=max(1, min(2, int(mic["max_input_channels"]))),
                          dtype="float32", callback=listen),
           sd.OutputStream(device=out["index"], samplerate=int(out["default_samplerate"]),
                           channels=2, dtype="int16", latency=0.03, callback=play)]
for stream in streams:
    stream.start()
print(json.dumps({"rate": rate}), flush=True)
signal.signal(signal.SIGTERM, lambda *a: None)
signal.pause()
"""


def cpu(window: float, warmup: float) -> None:
    from idle import Child, clean_env, cpu_seconds, start_server
    from pulse import PulseRig, unavailable_reason

    reason = unavailable_reason()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory(prefix="r2d2-echo-") as d, PulseRig(Path(d) / "rig") as rig:
        tmp = Path(d)
        env = clean_env(rig.env, os.environ.get("PYTHONPATH"))
        env.update(OPENAI_API_KEY="sk-bench-not-a-key", R2D2_LOG_LEVEL="INFO",
                   R2D2_VAD_SILENCE_MS="300")
        server, url = start_server(env, tmp)
        person = tmp / "person.wav"
        import soundfile as sf

        sf.write(person, to_int16(person_at(espeak_pcm(PERSON_SAYS, tmp, rate=DEVICE_RATE,
                                                       voice=PERSON_VOICE), DEVICE_RATE)),
                 DEVICE_RATE, subtype="PCM_16")
        procs = [Child("floor", [sys.executable, "-c", DUPLEX_FLOOR], re.compile(r'"rate"'),
                       tmp / "floor.log")]
        for mode in ("aec", "off"):
            argv = [str(Path(sys.executable).parent / "r2d2voice"), "run", "--backend",
                    "openai", "--url", url, "--db", str(tmp / f"{mode}.db")]
            procs.append(Child(mode, argv, re.compile(r"\bready:"), tmp / f"{mode}.log"))
        try:
            for child in procs:
                child.start({**env, "R2D2_ECHO": child.name if child.name != "floor" else ""},
                            tmp)
            while not all(c.is_ready() for c in procs):
                time.sleep(0.1)
            talker = subprocess.Popen(
                ["sh", "-c", f"while true; do paplay --device=mic {person}; sleep 3; done"],
                env=rig.env)
            time.sleep(warmup)
            start = {c.name: cpu_seconds(c.proc.pid) for c in procs if c.proc}
            t0 = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - t0
            used = {c.name: 100 * (cpu_seconds(c.proc.pid) - start[c.name]) / elapsed
                    for c in procs if c.proc}
            talker.terminate()
        finally:
            for child in procs:
                if child.proc is not None:
                    child.stop()
            server.terminate()
        turns = {m: _turns(tmp / f"{m}.db") for m in ("aec", "off")}
        print(f"\nCPU % of one core over {window:.0f} s of conversation (user+sys, all threads)")
        print(f"floor (bare PortAudio input + output streams): {used['floor']:.2f}%")
        for mode in ("aec", "off"):
            ratio = used[mode] / max(used["floor"], 1e-9)
            print(f"run R2D2_ECHO={mode}: {used[mode]:.2f}%  ratio {ratio:.1f}x the floor  "
                  f"({turns[mode]} replies)")
        print(f"the canceller's share: {used['aec'] - used['off']:.2f}% of a core "
              f"({used['aec'] / max(used['off'], 1e-9):.2f}x of run without it)")


def _turns(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM messages WHERE role='assistant'"
                                ).fetchone()[0]
    except sqlite3.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU figures on the rig instead")
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    if args.cpu:
        cpu(args.window, args.warmup)
        return
    with tempfile.TemporaryDirectory(prefix="r2d2-echo-") as d:
        sweep(Path(d))


if __name__ == "__main__":
    main()
