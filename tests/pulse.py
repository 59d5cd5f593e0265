"""A private PulseAudio server with virtual sound cards, for tests that need real audio devices.

The rig runs ``pulseaudio`` as a child of the test process with its own runtime directory, HOME
and socket (nothing touches a user's sound server), and two null sinks:

- ``mic``: tests play into it (``paplay``); its monitor ``mic.monitor`` is the default *source*,
  so a program recording from the default input hears what was played.
- ``speaker``: the default *sink*; tests record what a program played from ``speaker.monitor``.

Both run at 48 kHz and are kept clocked by a silent 10 ms-latency stream each (an idle null
sink sleeps 2 s between wake-ups, which would stall every new stream by up to 2 s).

PortAudio reaches the server through ALSA's pulse plugin (libasound2-plugins): with the rig's
environment the ALSA devices ``pulse`` and ``default`` (routed to pulse) appear in sounddevice's
list. PortAudio reads the ALSA configuration and enumerates devices once, at ``Pa_Initialize``
(when sounddevice is imported), and caches the list for the life of the process. So device code
runs in a **subprocess** started with ``rig.env`` (``rig.run_python``); the pytest process itself
never imports sounddevice with the rig's environment, and a PortAudio crash cannot take pytest down.

``tests/conftest.py`` makes one rig per test session, the fixture ``pulse_rig``.

When the rig cannot run here the fixture skips with the reason; under ``CI=true`` it fails
instead, so a CI machine missing PulseAudio cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("pulseaudio", "pactl", "pacat", "paplay", "parecord")
ALSA_PULSE_PLUGIN = "libasound_module_pcm_pulse.so"


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the test process dies (no stray servers after a crash)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def skip_or_fail(reason: str) -> None:
    """Skip the test, except under ``CI=true`` where a missing rig is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the audio rig must run in CI)", pytrace=False)
    pytest.skip(reason)


def unavailable_reason() -> str | None:
    """Why the rig cannot run on this machine, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"PulseAudio rig unavailable: {', '.join(missing)} not found "
            "(apt install pulseaudio pulseaudio-utils)"
        )
    patterns = [
        f"/usr/lib/*/alsa-lib/{ALSA_PULSE_PLUGIN}",
        f"/usr/lib*/alsa-lib/{ALSA_PULSE_PLUGIN}",
    ]
    if not any(glob.glob(p) for p in patterns):
        return (
            "PulseAudio rig unavailable: ALSA pulse plugin missing (apt install libasound2-plugins)"
        )
    return None


class PulseRig:
    """A running private PulseAudio server; see the module docstring."""

    def __init__(self, root: Path, *, start_timeout: float = 15.0) -> None:
        self.root = root
        runtime = root / "run"
        self.runtime_path = runtime / "pulse"
        self.home = root / "home"
        self.socket = self.runtime_path / "native"
        self.log_path = root / "pulseaudio.log"
        for d in (self.runtime_path, self.home):
            d.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o700)
        client_conf = root / "client.conf"
        # No autospawn: a client that cannot reach the rig must fail, not start a stray daemon.
        client_conf.write_text("autospawn = no\n")

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "ALSA_"))}
        env.pop("DISPLAY", None)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        env.update(
            HOME=str(self.home),
            XDG_RUNTIME_DIR=str(runtime),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            PULSE_RUNTIME_PATH=str(self.runtime_path),
            PULSE_SERVER=f"unix:{self.socket}",
            PULSE_CLIENTCONFIG=str(client_conf),
            PULSE_SOURCE="mic.monitor",
            PULSE_SINK="speaker",
        )
        pythonpath = [str(REPO)]
        if os.environ.get("PYTHONPATH"):
            pythonpath.append(os.environ["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        #: Environment for child processes that should use the rig.
        self.env: dict[str, str] = env

        argv = [
            "pulseaudio",
            "--daemon=no",
            "-n",  # no default.pa: only the modules below
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--disallow-exit",
            "--log-target=stderr",
            "--log-level=notice",
            f"--load=module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
            "--load=module-null-sink sink_name=mic rate=48000"
            " sink_properties=device.description=mic",
            "--load=module-null-sink sink_name=speaker rate=48000"
            " sink_properties=device.description=speaker",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Running as root prints a warning and works (user mode, our own socket).
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._keepalive: list[subprocess.Popen[bytes]] = []
        try:
            self._wait_ready(start_timeout)
            self.pactl("set-default-sink", "speaker")
            self.pactl("set-default-source", "mic.monitor")
            for sink in ("mic", "speaker"):
                self._keep_clocked(sink)
        except Exception:
            self.stop()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with {self._proc.returncode}: {self.log()}")
            if self.socket.exists():
                probe = subprocess.run(
                    ["pactl", "info"], env=self.env, capture_output=True, timeout=5
                )
                if probe.returncode == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"pulseaudio did not start within {timeout:g} s: {self.log()}")

    def _keep_clocked(self, sink: str) -> None:
        """Keep ``sink`` running with a 10 ms latency, as a real sound card would be.

        An idle null sink sleeps for its maximum latency (2 s) and only notices a new stream at
        the next wake-up, so every stream would start with a stall of up to 2 s. A silent
        low-latency stream (zeros add nothing to the mix) keeps it waking every 10 ms.
        """
        before = len(self.clients("sink-inputs"))
        proc = subprocess.Popen(
            [
                "pacat",
                "--playback",
                f"--device={sink}",
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=1",
                "--latency-msec=10",
                "--client-name=rig-keepalive",
                "/dev/zero",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self._keepalive.append(proc)
        self.wait_until(lambda: len(self.clients("sink-inputs")) > before)
        # The sink may still be in its first 2 s sleep: a suspend/resume cycle restarts its clock.
        self.pactl("suspend-sink", sink, "1")
        self.pactl("suspend-sink", sink, "0")

    def log(self, lines: int = 15) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        for keepalive in self._keepalive:
            keepalive.terminate()
            keepalive.wait(timeout=5)
        self._keepalive.clear()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> PulseRig:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------------

    def pactl(self, *args: str) -> str:
        """Run ``pactl`` against the rig and return its output."""
        res = subprocess.run(
            ["pactl", *args], env=self.env, capture_output=True, text=True, timeout=10
        )
        if res.returncode != 0:
            raise RuntimeError(f"pactl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def load_module(self, name: str, **args: object) -> int:
        """Load a module (e.g. another null sink) and return its index."""
        argv = ["load-module", name, *(f"{k}={v}" for k, v in args.items())]
        return int(self.pactl(*argv).strip())

    def unload_module(self, index: int) -> None:
        self.pactl("unload-module", str(index))

    def clients(self, kind: str) -> list[str]:
        """Rows of ``pactl list short <kind>`` (e.g. "source-outputs", "sink-inputs")."""
        return [line for line in self.pactl("list", "short", kind).splitlines() if line.strip()]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("rig condition not reached")
            time.sleep(0.02)

    # -- audio in and out --------------------------------------------------------------------

    def play(self, path: str | os.PathLike[str], *, sink: str = "mic") -> None:
        """Play a sound file into a sink (default ``mic``) and wait until it has been played."""
        subprocess.run(
            ["paplay", f"--device={sink}", os.fspath(path)],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    @contextlib.contextmanager
    def record(
        self,
        path: str | os.PathLike[str],
        *,
        source: str = "speaker.monitor",
        rate: int = 48000,
        channels: int = 1,
    ) -> Iterator[Path]:
        """Record ``source`` into a WAV file while the block runs.

        Recording is connected before the block starts; the file is complete when it ends.
        """
        before = len(self.clients("source-outputs"))
        proc = subprocess.Popen(
            [
                "parecord",
                f"--device={source}",
                f"--rate={rate}",
                f"--channels={channels}",
                "--format=s16le",
                "--file-format=wav",
                "--latency-msec=20",
                os.fspath(path),
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.wait_until(lambda: len(self.clients("source-outputs")) > before)
            yield Path(path)
        finally:
            # pacat finishes the WAV header on SIGINT/SIGTERM.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run_python(
        self, script: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python script in a child process that sees the rig (see the module docstring)."""
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_json(self, script: str, *args: str, timeout: float = 60.0) -> object:
        """Run a script that prints one JSON document as its last line of output; return it."""
        res = self.run_python(script, *args, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(
                f"child exited with {res.returncode}\nstdout:\n{res.stdout}\n"
                f"stderr:\n{res.stderr}\nserver log: {self.log()}"
            )
        lines = res.stdout.strip().splitlines()
        if not lines:
            raise AssertionError(f"child printed nothing\nstderr:\n{res.stderr}")
        return json.loads(lines[-1])


@contextlib.contextmanager
def open_pulse_rig() -> Iterator[PulseRig]:
    """Start a rig in a fresh temporary directory; skip (or fail under CI=true) if impossible."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    # A short path: AF_UNIX socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="r2pulse-") as tmp:
        try:
            rig = PulseRig(Path(tmp))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            skip_or_fail(f"PulseAudio rig could not start: {exc}")
            raise  # unreachable: skip_or_fail raises
        with rig:
            yield rig
