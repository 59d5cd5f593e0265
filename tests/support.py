"""Helpers shared by the tests: signals (tones, silence, espeak speech), a scrubbed environment,
the CLI in a subprocess, the local backend on a loopback port, and systemd's notify socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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
#: Settings that price the local backend as if billed, audio out only: 5,000 USD per 1M tokens,
#: so a 1 s reply (20 tokens) costs exactly $0.10.
PRICED = {"R2D2_BILL_LOCAL": "on", "R2D2_PRICE_AUDIO_OUT": "5000",
          **{f"R2D2_PRICE_{k}": "0" for k in ("AUDIO_IN", "AUDIO_IN_CACHED", "TEXT_IN",
                                              "TEXT_IN_CACHED", "TEXT_OUT")}}


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


def free_port() -> int:
    """A loopback TCP port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def espeak_wav(text: str, path: Path, voice: tuple[str, ...] = ()) -> Path:
    """Speech made by espeak-ng, as a WAV file at ``path``; ``voice``: more espeak-ng options
    (``("-v", "en+f3", "-p", "70")``: another person than the default voice)."""
    require_tool("espeak-ng")
    subprocess.run(["espeak-ng", *voice, "-w", str(path), text], check=True,
                   capture_output=True)
    return path


def espeak_pcm(text: str, tmp_path: Path, rate: int = RATE,
               voice: tuple[str, ...] = ()) -> np.ndarray:
    """Speech made by espeak-ng as int16 mono at ``rate``."""
    import soundfile as sf
    import soxr

    wav = espeak_wav(text, tmp_path / f"speech-{abs(hash((text, voice)))}.wav", voice)
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


# -- systemd's side of $NOTIFY_SOCKET -------------------------------------------------------------


def drain(sock: socket.socket) -> list[str]:
    """Every datagram queued on the non-blocking ``sock``, decoded, in arrival order."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def statuses(sock: socket.socket) -> list[str]:
    """The ``STATUS=`` values queued on the non-blocking ``sock``, in order."""
    return [line[len("STATUS="):] for message in drain(sock) for line in message.splitlines()
            if line.startswith("STATUS=")]


class NotifyListener:
    """A bound ``AF_UNIX`` datagram socket standing in for systemd's ``$NOTIFY_SOCKET`` of a
    child process; a thread receives every datagram (one sd_notify message of ``KEY=value``
    lines) in arrival order."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="r2n-")  # AF_UNIX socket paths are short (108 B)
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.05)
        self._messages: list[str] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                if self._closing.is_set():
                    return  # nothing left in the queue
                continue
            except OSError:
                return
            self._messages.append(data.decode())

    def close(self) -> None:
        """Stop after draining what is already queued (messages sent before the child exited)."""
        self._closing.set()
        self._thread.join(timeout=5)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def messages(self) -> list[str]:
        return list(self._messages)

    def lines(self) -> list[str]:
        """Every ``KEY=value`` line, in the order they came."""
        return [line for msg in self.messages for line in msg.splitlines()]

    def statuses(self) -> list[str]:
        return [line[len("STATUS="):] for line in self.lines() if line.startswith("STATUS=")]


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """A whole (short) sound file as 24 kHz mono int16, through the replay's own reader
    (its UsageError for a file it cannot open; one for a file it could not read to the end)."""
    from r2d2voice.audio.files import AudioReader
    from r2d2voice.errors import UsageError

    reader = AudioReader(path)
    blocks = list(reader.blocks())
    if reader.truncated or not blocks:
        raise UsageError(f"cannot read audio file {reader.shown}: truncated or corrupt audio data")
    return np.concatenate(blocks)


def speech_frames(pcm: np.ndarray) -> list[bytes]:
    """24 kHz int16 audio as the pipeline's 20 ms frames (the last one zero-padded)."""
    from r2d2voice.audio.pcm import Framer

    framer = Framer()
    frames = list(framer.push(np.asarray(pcm, np.int16)))
    last = framer.flush()
    return frames + ([last] if last is not None else [])
