"""``r2d2voice events``: the run's event stream on a Unix socket, ``events.sock``, next to the
control socket (the same runtime directory: ``system/control.py``), mode 0600.

A follower connects and sends one line, ``follow`` and the names it wants (``*``: every event
but ``level``; ``level`` adds it); then it gets one JSON object a line until the run stops,
when the socket closes. Each follower has a queue of :data:`FOLLOWER_BOUND` moments: one that
reads too slowly loses moments (counted, logged when it leaves), never delays the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import trio

from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.system.control import EXCHANGE_TIMEOUT, SYSTEM_DIR, bind_unix, runtime_dir
from r2d2voice.system.events import LEVEL, NAMES, Events

log = logging.getLogger("r2d2voice.system.event_socket")

__all__ = ["EVENTS_SOCKET", "follow_events", "request_line", "serve_events"]

EVENTS_SOCKET = "events.sock"
#: moments queued for one follower; beyond it they are dropped and counted
FOLLOWER_BOUND = 256
#: at most this many followers at once (each has its queue); more are turned away
MAX_FOLLOWERS = 16
#: after the run stops, followers have this long to take what is queued for them
DRAIN_S = 1.0
_MAX_REQUEST = 1024


def request_line(names: Iterable[str] = (), *, level: bool = False) -> str:
    """What a follower sends: ``follow *`` (every event but level), ``follow speaking spoken``…"""
    chosen = list(dict.fromkeys(names)) or ["*"]
    if level and LEVEL not in chosen:
        chosen.append(LEVEL)
    return "follow " + " ".join(chosen) + "\n"


def _parse_request(line: str) -> tuple[list[str] | None, bool]:
    """(names or None for all, level); ValueError saying what is wrong."""
    words = line.split()
    if not words or words[0] != "follow":
        raise ValueError(f"unknown request {line.strip()[:40]!r} (expected: follow NAME…)")
    wanted = words[1:] or ["*"]
    level = LEVEL in wanted
    rest = [w for w in wanted if w not in ("*", LEVEL)]
    unknown = [w for w in rest if w not in NAMES]
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r} (known: {', '.join(NAMES)})")
    return (None if "*" in wanted else rest), level


async def serve_events(hub: Events, *, directory: Path | None = None,
                       task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Serve ``hub`` on ``events.sock`` until the hub closes; then give the followers
    :data:`DRAIN_S` to take what is queued, close them and remove the socket.
    ``task_status.started(path)``, or None (with a warning) when there is no socket: another
    run serves one there, or it cannot be made; the run goes on without it."""
    try:
        directory = directory or runtime_dir(create=True)
        path = directory / EVENTS_SOCKET
        listener = await bind_unix(path, backlog=MAX_FOLLOWERS)
        os.chmod(path, 0o600)
        inode = os.stat(path).st_ino
    except FileExistsError:
        log.warning("another r2d2voice run serves `r2d2voice events` in %s: not this one",
                    directory)
        task_status.started(None)
        return
    except (ConfigError, OSError) as exc:
        log.warning("no events socket (%s): `r2d2voice events` cannot follow this run",
                    getattr(exc, "strerror", None) or exc)
        task_status.started(None)
        return
    followers = [0]
    try:
        async with listener, trio.open_nursery() as nursery:
            accept = trio.CancelScope()

            async def accepting() -> None:
                with accept:
                    while True:
                        stream = await listener.accept()
                        nursery.start_soon(_follow, stream, hub, followers)

            nursery.start_soon(accepting)
            task_status.started(path)
            await hub.wait_closed()
            accept.cancel()
            nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()


async def _follow(stream: trio.SocketStream, hub: Events, followers: list[int]) -> None:
    async with stream:
        try:
            with trio.move_on_after(EXCHANGE_TIMEOUT):
                line = await _read_line(stream)
            names, level = _parse_request(line)
        except ValueError as exc:
            await _say(stream, f"error: {exc}\n")
            return
        if followers[0] >= MAX_FOLLOWERS:
            await _say(stream, f"error: already {MAX_FOLLOWERS} followers\n")
            return
        followers[0] += 1
        log.info("events: a follower joined (%s%s)", ", ".join(names) if names else "all",
                 " and level" if level else "")
        try:
            with (hub.following(names, level=level, bound=FOLLOWER_BOUND) as sub,
                  contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)):
                async for moment in sub.receive:
                    await stream.send_all(moment.line.encode() + b"\n")
        finally:
            followers[0] -= 1
        if sub.dropped:
            log.info("an events follower read too slowly: %d events dropped", sub.dropped)


async def _read_line(stream: trio.SocketStream) -> str:
    data = b""
    while b"\n" not in data and len(data) < _MAX_REQUEST:
        chunk = await stream.receive_some(_MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


async def _say(stream: trio.SocketStream, text: str) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(text.encode())


def follow_events(names: Iterable[str] = (), *, level: bool = False,
                  directory: Path | None = None, out: TextIO | None = None) -> None:
    """Print the running appliance's events, one JSON object a line, until it stops (then
    return). RuntimeFailure when no run is found (or it refuses the request)."""
    import sys

    out = out or sys.stdout
    candidates = [directory] if directory else [runtime_dir(), SYSTEM_DIR]
    sock, denied = None, []
    for folder in dict.fromkeys(candidates):
        try:
            sock = _connect(folder / EVENTS_SOCKET)
        except PermissionError:
            denied.append(str(folder))
            continue
        if sock is not None:
            break
    if sock is None:
        if denied:
            raise RuntimeFailure(f"not allowed to follow the r2d2voice run in "
                                 f"{', '.join(denied)}: for the system service use sudo")
        looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise RuntimeFailure(f"no running r2d2voice found (looked in {looked})")
    with sock, sock.makefile("r", encoding="utf-8", newline="\n") as lines:
        sock.sendall(request_line(names, level=level).encode())
        for line in lines:
            if line.startswith("error: "):
                raise RuntimeFailure(f"the r2d2voice run answered: {line[7:].strip()}")
            out.write(line)
            out.flush()


def _connect(path: Path) -> socket.socket | None:
    """A connection to ``path``; None when nothing serves it (PermissionError passes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except PermissionError:
        sock.close()
        raise
    except OSError:
        sock.close()
        return None
    return sock
