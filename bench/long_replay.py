"""Replay of a long recording: peak RSS, time to the first answered turn, total time.

Builds a WAV of ``--hours`` hours (a spoken question every ``--every`` seconds, silence between:
espeak-ng speech at 16 kHz, so a 10-hour file is ~1.1 GB), then runs ``r2d2voice replay --backend
local`` on it in a child process and prints:

    file: 10.0 h, 1152 MB, 120 turns
    first transcript after 1.9 s; 120 turns answered in 842 s wall; peak RSS 96 MB

Usage: python bench/long_replay.py [--hours 10] [--every 300] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def speech(text: str, tmp: Path) -> np.ndarray:
    wav = tmp / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    data, rate = sf.read(wav, dtype="int16")
    import soxr

    return np.round(soxr.resample(data.astype(np.float32) / 32768, rate, RATE) * 32767
                    ).astype(np.int16)


def build(path: Path, hours: float, every: float, tmp: Path) -> int:
    """Write the long file block by block (never all in memory); returns the number of turns."""
    q = speech("hello R2, what is the weather like on Tatooine today?", tmp)
    turns = 0
    total = int(hours * 3600 * RATE)
    block = int(every * RATE)
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16") as out:
        written = 0
        while written < total:
            n = min(block, total - written)
            chunk = np.zeros(n, np.int16)
            if n > RATE + len(q):
                chunk[RATE:RATE + len(q)] = q
                turns += 1
            out.write(chunk)
            written += n
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=300.0, help="seconds between questions")
    ap.add_argument("--keep", type=Path, default=None, help="keep/reuse the WAV in this folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="r2long-"))
    try:
        folder = args.keep or tmp
        folder.mkdir(parents=True, exist_ok=True)
        wav = folder / f"long-{args.hours:g}h-{args.every:g}s.wav"
        if not wav.exists():
            turns = build(wav, args.hours, args.every, tmp)
        else:
            turns = int(args.hours * 3600 // args.every)
        print(f"file: {args.hours:g} h, {wav.stat().st_size / 2**20:.0f} MB, {turns} turns",
              flush=True)
        env = {**os.environ, "HOME": str(tmp), "R2D2_DB": str(tmp / "bench.db")}
        cmd = [sys.executable, "-m", "r2d2voice", "replay", str(wav), "--backend", "local",
               "--out", str(tmp / "reply.wav"), "--timeout", str(args.hours * 3600)]
        started = time.monotonic()
        first: float | None = None
        answered = 0
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                              cwd=tmp, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if first is None and line.startswith(("you:", "r2:")):
                    first = time.monotonic() - started
                if line.startswith("r2:"):
                    answered += 1
            code = proc.wait()
        wall = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        shown = f"{first:.1f} s" if first is not None else "never"
        print(f"first transcript after {shown}; {answered} turns answered in {wall:.0f} s wall;"
              f" peak RSS {peak:.0f} MB; exit {code}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
