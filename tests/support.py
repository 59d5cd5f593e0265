"""Helpers shared by the tests: signals (tones, silence, espeak speech), a scrubbed environment,
the CLI in a subprocess, and the local backend on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
RATE = 24000
SCRUBBED_PREFIXES = ("R2D2_", "OPENAI", "REALTIME", "NOTIFY_SOCKET", "JOURNAL", "WATCHDOG_")


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without r2d2voice settings or systemd sockets, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m r2d2voice ARGS`` in ``cwd`` with HOME there and a scrubbed environment."""
    full = clean_env(HOME=str(cwd), **(env or {}))
    return subprocess.run([sys.executable, "-m", "r2d2voice", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


async def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 60) -> Any:
    """Like :func:`run_cli`, from trio (``trio.run_process``); bytes output."""
    import trio

    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "r2d2voice", *args], cwd=cwd,
            env=env or clean_env(HOME=str(cwd)), capture_stdout=True, capture_stderr=True,
            check=False)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), np.int16)


def tone(seconds: float, dbfs: float = -20.0, freq: float = 440.0,
         rate: int = RATE) -> np.ndarray:
    """A sine at ``dbfs`` RMS as int16."""
    t = np.arange(round(seconds * rate)) / rate
    amp = 32768 * 10 ** (dbfs / 20) * np.sqrt(2)
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def require_tool(name: str) -> None:
    """Skip without ``name`` on PATH, except under CI=true where it is a failure."""
    if shutil.which(name) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required on CI")
        pytest.skip(f"{name} is not installed")


def espeak_wav(text: str, path: Path) -> Path:
    """Speech made by espeak-ng, as a WAV file at ``path``."""
    require_tool("espeak-ng")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def espeak_pcm(text: str, tmp_path: Path, rate: int = RATE) -> np.ndarray:
    """Speech made by espeak-ng as int16 mono at ``rate``."""
    import soundfile as sf
    import soxr

    wav = espeak_wav(text, tmp_path / "speech.wav")
    data, native = sf.read(wav, dtype="float32")
    return np.round(soxr.resample(data, native, rate) * 32767).astype(np.int16)


@asynccontextmanager
async def local_backend(**config: Any) -> AsyncIterator[str]:
    """The local backend on an ephemeral loopback port; yields its ws:// URL."""
    import trio

    from r2d2voice.localbackend.server import BackendConfig, serve_local

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_local, "127.0.0.1", 0, BackendConfig(**config))
        yield f"ws://127.0.0.1:{port}/v1/realtime"
        nursery.cancel_scope.cancel()
