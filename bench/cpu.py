"""Client CPU: ``r2d2voice replay --speed fast`` against a minimal openai-SDK realtime client.

Builds a 2-minute, 30-turn recording (espeak-ng sentences separated by 1.2-1.5 s of silence,
24 kHz mono PCM16), starts one ``r2d2voice serve-local`` and, in each run, streams the recording
to it twice, each time from a child process whose user+sys CPU seconds (``os.wait4``) and wall
time are measured; the server's CPU is not counted:

- ``r2d2voice``: ``r2d2voice replay REC --speed fast --backend local --url ...``
- ``openai-sdk``: this script re-invoked as ``--sdk-client URL REC``, written the way the SDK's
  realtime examples are: asyncio, ``AsyncOpenAI().realtime.connect``, 20 ms
  ``input_audio_buffer.append`` calls from a sender task, an ``async for event in conn``
  receiver that base64-decodes every audio delta and collects the transcripts.

Same pacing for both, so neither ever interrupts a reply: the audio up to each turn's end (as
the server VAD will close it, from :func:`r2d2voice.audio.vad.find_turns`) is sent as fast as
possible, then the client waits for that turn's ``response.done`` before sending more. Both
must receive all 30 replies whole. Prints the median of ``--runs`` runs and the ratio;
the target is r2d2voice <= 0.5x the SDK client's CPU.

    .venv/bin/python bench/cpu.py                 # 3 runs, ~4 min on 2 cores
    .venv/bin/python bench/cpu.py --runs 1 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from r2d2voice.audio.vad import find_turns

RATE = 24000
FRAME_SAMPLES = 480  # 20 ms
TURNS = 30
TARGET = 0.5
#: what r2d2voice's replay source appends after the file so the last turn closes
#: (silence_duration_ms 500 + its 700 ms margin); the SDK client sends the same audio.
TAIL_MS = 1200
MODEL = "gpt-realtime-2.1"
VENV_BIN = Path(sys.executable).parent

SENTENCES = [
    "Good morning, could you turn on the kitchen lights please?",
    "What is the weather going to be like this afternoon?",
    "Set a timer for twelve minutes for the pasta.",
    "Play some quiet music in the living room.",
    "How far away is the nearest train station from here?",
    "Remind me to call my sister at seven tonight.",
    "Is it going to rain before the weekend?",
    "Tell me a short story about a brave little robot.",
    "What time does the bakery on the corner open?",
    "Please add milk and eggs to the shopping list.",
    "How many days are left until the end of the month?",
    "Turn the heating down by two degrees, it is warm.",
    "Can you read me the headlines from this morning?",
    "What is the capital city of Australia again?",
    "Lock the front door and switch off the porch light.",
    "Who won the football match yesterday evening?",
    "Start the vacuum cleaner in the hallway now.",
    "How do you say thank you very much in Italian?",
    "Wake me up at half past six tomorrow morning.",
    "What should I cook for dinner with rice and beans?",
    "Open the garage door, I am coming home soon.",
    "How long does it take to boil an egg properly?",
    "Play the next episode of my favourite podcast.",
    "What is seventeen multiplied by twenty three?",
    "Close the curtains in the bedroom, please.",
    "Is there any traffic on the way to the office?",
    "Tell me a joke that a droid would find funny.",
    "When is the next full moon going to happen?",
    "Water the plants on the balcony at sunset.",
    "Thank you, that will be all for today, goodbye.",
]


# --------------------------------------------------------------------------- the recording


def _speak(text: str, workdir: Path, i: int) -> np.ndarray:
    """One espeak-ng utterance as 24 kHz float32, leading/trailing silence trimmed."""
    import soxr  # only here: the SDK client child need not pay for it
    path = workdir / f"utt{i:02d}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text],
                   check=True, capture_output=True)
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    path.unlink()
    audio = soxr.resample(audio[:, 0], rate, RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0]:loud[-1] + 1] if len(loud) else audio


def build_recording(path: Path) -> tuple[float, int]:
    """Write the 30-turn recording to ``path``; return its length in seconds and turns found."""
    rng = random.Random(7)
    parts = [np.zeros(int(0.5 * RATE), np.float32)]
    for i, text in enumerate(SENTENCES):
        speech = _speak(text, path.parent, i)
        parts.append(0.7 * speech / max(1e-6, float(np.abs(speech).max())))
        parts.append(np.zeros(int(rng.uniform(1.2, 1.5) * RATE), np.float32))
    pcm = (np.concatenate(parts) * 32767).astype(np.int16)
    soundfile.write(path, pcm, RATE, subtype="PCM_16")
    return len(pcm) / RATE, len(find_turns(pcm, RATE))


def load_padded(path: str) -> tuple[bytes, list[int]]:
    """The audio both clients send (file + closing tail, whole frames) and each turn's end frame.

    The end frame mirrors r2d2voice's fast replay: 5 frames past where the server VAD closes
    the turn.
    """
    pcm, rate = soundfile.read(path, dtype="int16")
    assert rate == RATE and pcm.ndim == 1, "bench recordings are 24 kHz mono"
    pcm = np.concatenate([pcm, np.zeros(RATE * TAIL_MS // 1000, np.int16)])
    pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % FRAME_SAMPLES, np.int16)])
    total = len(pcm) // FRAME_SAMPLES
    ends = [min(total, -(-t.close_sample // FRAME_SAMPLES) + 5) for t in find_turns(pcm, RATE)]
    return pcm.astype("<i2").tobytes(), ends


# --------------------------------------------------------------------------- the SDK client


async def sdk_client(url: str, rec: str) -> int:
    """Stream ``rec`` to ``url`` the way the openai SDK's realtime examples do; print a summary."""
    from openai import AsyncOpenAI

    data, ends = load_padded(rec)
    frame_bytes = FRAME_SAMPLES * 2
    total = len(data) // frame_bytes
    base = url.rsplit("/realtime", 1)[0]  # the SDK appends /realtime?model=...
    client = AsyncOpenAI(api_key="bench", websocket_base_url=base)
    audio = bytearray()
    transcripts: list[str] = []
    user_transcripts: list[str] = []
    completed = 0
    done = asyncio.Condition()

    async with client.realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": "You are R2-D2. You answer in beeps and whistles.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": {"model": "gpt-4o-transcribe"},
                    "turn_detection": {
                        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                        "silence_duration_ms": 500, "create_response": True,
                        "interrupt_response": True,
                    },
                },
                "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"},
            },
        })

        async def receive() -> None:
            nonlocal completed
            current: list[str] = []
            async for event in conn:
                if event.type == "response.output_audio.delta":
                    audio.extend(base64.b64decode(event.delta))
                elif event.type == "response.output_audio_transcript.delta":
                    current.append(event.delta)
                elif event.type == "response.output_audio_transcript.done":
                    transcripts.append(event.transcript)
                    current.clear()
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    user_transcripts.append(event.transcript)
                elif event.type == "error":
                    print(f"sdk-client: error event: {event.error.message}", file=sys.stderr)
                elif event.type == "response.done":
                    async with done:
                        if event.response.status == "completed":
                            completed += 1
                        done.notify_all()

        async def wait_for(n: int, timeout: float) -> None:
            async with done:
                await asyncio.wait_for(done.wait_for(lambda: completed >= n), timeout)

        async def send() -> None:
            frame = 0
            for turn, end in enumerate(ends, 1):
                for i in range(frame, end):
                    chunk = data[i * frame_bytes:(i + 1) * frame_bytes]
                    await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
                frame = end
                await wait_for(turn, 60.0)  # never talk over a reply, like replay --speed fast
            for i in range(frame, total):
                chunk = data[i * frame_bytes:(i + 1) * frame_bytes]
                await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())

        receiver = asyncio.create_task(receive())
        try:
            await send()
        finally:
            receiver.cancel()
    print(f"{completed} responses completed, {len(audio) / 2 / RATE:.1f} s of reply audio, "
          f"{len(transcripts)} reply transcripts, {len(user_transcripts)} user transcripts")
    return 0 if completed == len(ends) else 1


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    user: float
    sys: float
    wall: float
    replies: int

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def measure(argv: list[str], log: Path, cwd: Path) -> tuple[Result, int, str]:
    """Run ``argv`` to completion; its own user/sys CPU (os.wait4), wall time, exit, output."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Result(usage.ru_utime, usage.ru_stime, wall, 0), proc.returncode, log.read_text()


class RunFailed(Exception):
    """A client run that did not finish cleanly (reported, not counted in the figures)."""


def run_r2d2voice(url: str, rec: Path, tmp: Path, n: int) -> Result:
    db = tmp / f"bench{n}.db"
    argv = [str(VENV_BIN / "r2d2voice"), "replay", str(rec), "--speed", "fast",
            "--backend", "local", "--url", url, "--db", str(db), "--out", str(tmp / "reply.wav")]
    res, code, output = measure(argv, tmp / f"r2d2voice{n}.log", tmp)
    if code != 0:
        raise RunFailed(f"r2d2voice replay failed (exit {code}): {output.strip()[-500:]}")
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM messages WHERE role = 'assistant' AND interrupted = 0"
        ).fetchone()
    m = re.search(r"(\d+) turns? answered", output)
    if not m or int(m.group(1)) != rows:
        raise RunFailed(f"r2d2voice's summary disagrees with its database ({rows} replies): "
                        f"{output.strip()[-300:]}")
    res.replies = rows
    return res


def run_sdk(url: str, rec: Path, tmp: Path, n: int) -> Result:
    argv = [sys.executable, os.path.abspath(__file__), "--sdk-client", url, str(rec)]
    res, code, output = measure(argv, tmp / f"sdk{n}.log", tmp)
    m = re.search(r"(\d+) responses completed", output)
    if code != 0 or not m:
        raise RunFailed(f"SDK client failed (exit {code}): {output.strip()[-500:]}")
    res.replies = int(m.group(1))
    return res


#: What each client imports before doing anything (start-up cost, measured alone).
STARTUP = {
    "r2d2voice": [sys.executable, "-c",
                  "import r2d2voice.cli.main, r2d2voice.appliance.replay_file,"
                  " r2d2voice.appliance.compose, r2d2voice.appliance.sources,"
                  " r2d2voice.appliance.sinks"],
    "openai-sdk": [sys.executable, "-c",
                   "import numpy, soundfile, r2d2voice.audio.vad; from openai import AsyncOpenAI; "
                   "import openai.resources.realtime.realtime, websockets.asyncio.client"],
}


def measure_startup(argv: list[str], tmp: Path, runs: int = 5) -> float | None:
    """Median CPU seconds of a bare interpreter doing a client's imports (None if they fail)."""
    cpu = []
    for _ in range(runs):
        res, code, _ = measure(argv, tmp / "startup.log", tmp)
        if code != 0:
            return None
        cpu.append(res.cpu)
    return statistics.median(cpu)


def start_server(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([str(VENV_BIN / "r2d2voice"), "serve-local", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=tmp)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(ws://\S+)", line)
    if not m:
        proc.kill()
        sys.exit(f"serve-local did not announce its address: {line!r}")
    return proc, m.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per client (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--sdk-client", nargs=2, metavar=("URL", "REC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdk_client:
        sys.exit(asyncio.run(sdk_client(*args.sdk_client)))

    tmp = Path(tempfile.mkdtemp(prefix="r2d2-cpu-"))
    server = None
    try:
        rec = tmp / "talk.wav"
        seconds, turns = build_recording(rec)
        print(f"recording: {rec} ({seconds:.1f} s, {turns} turns found by r2d2voice.audio.vad)")
        if turns != TURNS:
            sys.exit(f"expected {TURNS} turns in the recording, the VAD found {turns}")
        server, url = start_server(tmp)
        print(f"server: {url} (its CPU is not counted)")
        results: dict[str, list[Result]] = {"r2d2voice": [], "openai-sdk": []}
        failures: dict[str, int] = {name: 0 for name in results}
        for n in range(args.runs):
            for name, run in (("r2d2voice", run_r2d2voice), ("openai-sdk", run_sdk)):
                # alternate, so drift hits both alike
                try:
                    res = run(url, rec, tmp, n)
                except RunFailed as exc:
                    failures[name] += 1
                    print(f"  run {n + 1}/{args.runs} {name:<10} FAILED: {exc}", flush=True)
                    continue
                results[name].append(res)
                print(f"  run {n + 1}/{args.runs} {name:<10} cpu {res.cpu:6.2f} s  "
                      f"wall {res.wall:6.1f} s  replies {res.replies}", flush=True)
        if not all(results.values()):
            sys.exit("no successful run for one of the clients; no figures")

        startup = {name: measure_startup(argv, tmp) for name, argv in STARTUP.items()}
        print("\nmedian run per client; whole client process (python start-up and imports "
              "included)\nstart-up: a bare interpreter doing just that client's imports")
        print(f"{'client':<12}{'user s':>9}{'sys s':>9}{'total s':>9}{'wall s':>9}{'replies':>9}"
              f"{'cpu min-max':>15}{'start-up':>10}")
        medians = {}
        for name, runs in results.items():
            med = sorted(runs, key=lambda r: r.cpu)[len(runs) // 2]
            medians[name] = med
            lo, hi = min(r.cpu for r in runs), max(r.cpu for r in runs)
            boot = f"{startup[name]:10.2f}" if startup[name] is not None else f"{'n/a':>10}"
            print(f"{name:<12}{med.user:9.2f}{med.sys:9.2f}{med.cpu:9.2f}{med.wall:9.1f}"
                  f"{min(r.replies for r in runs):>9}{f'{lo:.2f}-{hi:.2f}':>15}{boot}")
        ratio = medians["r2d2voice"].cpu / medians["openai-sdk"].cpu
        print(f"\nratio r2d2voice / openai-sdk CPU: {ratio:.2f}  (target <= {TARGET}: "
              f"{'met' if ratio <= TARGET else 'NOT met'})")
        if all(v is not None for v in startup.values()):
            steady = [(medians[n].cpu - (startup[n] or 0.0)) for n in ("r2d2voice", "openai-sdk")]
            if steady[1] > 0:
                print(f"without start-up: {steady[0]:.2f} s vs {steady[1]:.2f} s, "
                      f"ratio {steady[0] / steady[1]:.2f}")
        short = [n for n, rs in results.items() if any(r.replies != TURNS for r in rs)]
        if short:
            print(f"warning: {', '.join(short)} did not receive all {TURNS} replies in every run")
        for name, count in failures.items():
            if count:
                print(f"warning: {name} failed {count} of {args.runs} run(s) (not counted; "
                      f"see above)")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
