"""``r2d2voice wake``: telling a running ``r2d2voice run`` to start a conversation.

The run serves a Unix socket, ``control.sock``, in its runtime directory (one ``wake`` line in,
``ok`` out), takes SIGUSR1 as the same request, and writes its pid to ``r2d2voice.pid`` there.
The runtime directory is ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``), else
``$XDG_RUNTIME_DIR/r2d2voice``, else ``/tmp/r2d2voice-UID`` (0700, checked to be ours).
``wake`` looks there, then in the system service's ``/run/r2d2voice``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from r2d2voice.errors import ConfigError, RuntimeFailure

log = logging.getLogger("r2d2voice.system.control")

__all__ = ["PID_NAME", "SOCKET_NAME", "SYSTEM_DIR", "bind_unix", "runtime_dir", "send_wake",
           "serve_control"]

SOCKET_NAME = "control.sock"
PID_NAME = "r2d2voice.pid"
#: The system service's runtime directory (``RuntimeDirectory=r2d2voice``).
SYSTEM_DIR = Path("/run/r2d2voice")
#: A client has this long to send its line, ``wake`` this long for the answer.
EXCHANGE_TIMEOUT = 2.0
_MAX_LINE = 64


def runtime_dir(environ: Mapping[str, str] | None = None, *, create: bool = False) -> Path:
    """Where the control socket and the pid file live (see the module docstring); with
    ``create``, made if missing. A /tmp fallback that is not a 0700 directory of ours is a
    ConfigError (someone else could have made it)."""
    env = os.environ if environ is None else environ
    if env.get("RUNTIME_DIRECTORY"):
        return _made(Path(env["RUNTIME_DIRECTORY"].split(":")[0]), create)
    if env.get("XDG_RUNTIME_DIR"):
        return _made(Path(env["XDG_RUNTIME_DIR"]) / "r2d2voice", create)
    path = Path(tempfile.gettempdir()) / f"r2d2voice-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
    if path.exists():
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"{path} is not a private (0700) directory of this user: remove "
                              "it, or set XDG_RUNTIME_DIR")
    return path


def _made(path: Path, create: bool) -> Path:
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


#: what a wake did: None, it was taken; a sentence, why nothing can happen now
Wake = Callable[[], "str | None"]


async def serve_control(on_wake: Wake, *, directory: Path | None = None,
                        task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
                        ) -> None:
    """Until cancelled, call ``on_wake()`` for every ``wake`` on the control socket and every
    SIGUSR1; what it says back (why the wake can do nothing now) goes to the asker.
    ``task_status.started(socket path)``, or None when another run already serves the socket
    or it cannot be made (then only SIGUSR1 works; a warning says why). Removes the socket and
    the pid file it made on the way out."""
    try:
        directory = directory or runtime_dir(create=True)
    except (ConfigError, OSError) as exc:
        log.warning("no control socket (%s): only SIGUSR1 wakes this run (pid %d)",
                    exc, os.getpid())
        directory = None
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, on_wake)
            listener = None if directory is None else await _listen(directory / SOCKET_NAME)
            if directory is None or listener is None:
                task_status.started(None)
                await trio.sleep_forever()
            path, pid_path = directory / SOCKET_NAME, directory / PID_NAME
            try:
                with contextlib.suppress(OSError):
                    pid_path.write_text(f"{os.getpid()}\n")
                task_status.started(path)
                await trio.serve_listeners(functools.partial(_answer, on_wake=on_wake),
                                           [listener])
            finally:
                _remove_ours(path, pid_path)


async def _on_signals(signals: trio.abc.ReceiveChannel[int], on_wake: Wake) -> None:
    async for _ in signals:
        log.info("SIGUSR1: wake")
        on_wake()


async def _listen(path: Path) -> trio.SocketListener | None:
    """A listener on ``path``; a stale socket file is replaced, a live one left alone."""
    try:
        return await bind_unix(path)
    except FileExistsError:
        log.warning("another r2d2voice run answers `r2d2voice wake` on %s; this one only "
                    "takes SIGUSR1 (pid %d)", path, os.getpid())
    except OSError as exc:
        log.warning("no control socket at %s (%s): `r2d2voice wake` falls back to SIGUSR1",
                    path, exc.strerror or exc)
    return None


async def bind_unix(path: Path, *, backlog: int = 4) -> trio.SocketListener:
    """A listener on the Unix socket ``path`` (a run's sockets: control, events). A stale socket
    file is replaced; one another process still answers on is FileExistsError; OSError when it
    cannot be made."""
    if path.exists() or path.is_symlink():
        if await trio.to_thread.run_sync(_is_live, path):
            raise FileExistsError(f"{path} is served by another process")
        path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(EXCHANGE_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def _answer(stream: trio.SocketStream, on_wake: Wake) -> None:
    """One request: a line in, a line out; a silent or broken client is dropped."""
    async with stream:
        with trio.move_on_after(EXCHANGE_TIMEOUT):
            data = b""
            while b"\n" not in data and len(data) < _MAX_LINE:
                chunk = await stream.receive_some(_MAX_LINE)
                if not chunk:
                    break
                data += chunk
            command = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
            if command == "wake":
                log.info("control socket: wake")
                busy = on_wake()
                reply = b"ok\n" if busy is None else f"busy: {busy}\n".encode()
            else:
                reply = f"error: unknown command {command!r} (known: wake)\n".encode()
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(reply)


def _remove_ours(path: Path, pid_path: Path) -> None:
    try:
        if pid_path.read_text().strip() == str(os.getpid()):
            pid_path.unlink()
            path.unlink(missing_ok=True)
    except OSError:
        pass


def send_wake(directory: Path | None = None) -> str:
    """Ask the running ``r2d2voice run`` to start a conversation: through its control socket,
    else SIGUSR1 to the pid in its pid file. Returns what was done (one line); RuntimeFailure
    when no run is found."""
    candidates = [directory] if directory else [runtime_dir(), SYSTEM_DIR]
    denied: list[str] = []
    for folder in dict.fromkeys(candidates):
        try:
            done = _wake_in(folder)
        except PermissionError:
            denied.append(str(folder))
            continue
        if done:
            return done
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    if denied:
        raise RuntimeFailure(f"not allowed to reach the r2d2voice run in {', '.join(denied)}: "
                             "for the system service use sudo r2d2voice wake")
    raise RuntimeFailure(f"no running `r2d2voice run` found (looked in {looked})")


def _wake_in(folder: Path) -> str | None:
    path = folder / SOCKET_NAME
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(EXCHANGE_TIMEOUT)
            try:
                sock.connect(str(path))
                sock.sendall(b"wake\n")
                reply = sock.recv(256).decode("utf-8", "replace").strip()
            except PermissionError:
                raise
            except OSError:
                reply = ""  # a stale socket: try the pid file
        if reply == "ok":
            return f"woke the r2d2voice run listening on {path}"
        if reply.startswith("busy: "):
            raise RuntimeFailure(f"the r2d2voice run on {path} cannot be woken now: "
                                 f"{reply.removeprefix('busy: ')}")
        if reply:
            raise RuntimeFailure(f"{path} answered: {reply}")
    pid = _running_pid(folder / PID_NAME)
    if pid is None:
        return None
    os.kill(pid, signal.SIGUSR1)
    return f"sent SIGUSR1 to the r2d2voice run (pid {pid})"


def _running_pid(pid_path: Path) -> int | None:
    """The pid in ``pid_path`` if that process is an r2d2voice (a stale file may name another
    process, which SIGUSR1 would kill)."""
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        raise
    except OSError:
        return None
    return pid if b"r2d2voice" in cmdline else None
