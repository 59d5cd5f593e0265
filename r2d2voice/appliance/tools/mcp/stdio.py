"""A local MCP server as one process for the whole run, spoken to over its stdin and stdout.

Unlike the SDK's ``stdio_client`` (which passes on HOME, LOGNAME, SHELL, TERM and USER), the
server gets only PATH, LANG and HOME (plus its ``[mcp.env]``), runs in a process group of its
own with ``/`` as its working directory, and its stderr goes to the log line by line. On the way
out its stdin is closed, it has ``GRACE_S`` to exit, then the whole group gets SIGTERM and,
after the same grace, SIGKILL: nothing it started outlives the run.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import anyio
import mcp_types
import trio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.shared.message import SessionMessage

from r2d2voice.appliance.tools.config import one_line
from r2d2voice.appliance.tools.mcp.config import McpSpec
from r2d2voice.appliance.tools.process import _end_group, minimal_env

log = logging.getLogger("r2d2voice.appliance.tools.mcp")

GRACE_S = 2.0
#: one JSON-RPC message longer than this ends the connection (a server gone wrong)
MAX_LINE = 8 * 1024 * 1024
#: a stderr line is logged cut to this many characters
STDERR_LINE = 400
_READ = 64 * 1024

Streams = tuple[ObjectReceiveStream[SessionMessage | Exception],
                ObjectSendStream[SessionMessage]]


@dataclass
class Process:
    """The running server as the client sees it: its pid, and whether its stdout has ended."""

    pid: int
    ended: trio.Event


def server_env(spec: McpSpec) -> dict[str, str]:
    """PATH, LANG and HOME (as for a command tool), then the server's own ``[mcp.env]``."""
    return {**minimal_env(), **spec.env}


@asynccontextmanager
async def stdio_transport(spec: McpSpec,
                          started: Callable[[Process], None] | None = None
                          ) -> AsyncIterator[Streams]:
    """Start ``spec``'s server and yield the SDK's (read, write) streams to it. OSError if it
    cannot start. ``started`` is told its pid (and when its stdout ends: it exited)."""
    assert spec.command is not None
    proc = await trio.lowlevel.open_process(
        list(spec.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=server_env(spec), cwd="/", start_new_session=True)
    process = Process(proc.pid, trio.Event())
    if started is not None:
        started(process)
    # unbuffered, like the SDK's: a message waits for the session to take it
    to_session, read = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write, from_session = anyio.create_memory_object_stream[SessionMessage](0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stdout, proc, to_session, process.ended, spec.name)
            nursery.start_soon(_stdin, proc, from_session)
            nursery.start_soon(_stderr, proc, spec.name)
            try:
                yield read, write
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3 * GRACE_S + 1):
            await _stop(proc)
        for stream in (read, write, to_session, from_session):
            stream.close()


async def _stop(proc: trio.Process) -> None:
    """Close stdin, give the server ``GRACE_S`` to exit, then end its whole group."""
    if proc.stdin is not None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await proc.stdin.aclose()
    with trio.move_on_after(GRACE_S):
        await proc.wait()
    await _end_group(proc, GRACE_S)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            await stream.aclose()
    with trio.move_on_after(GRACE_S):
        await proc.wait()


async def _stdout(proc: trio.Process,
                  to_session: ObjectSendStream[SessionMessage | Exception],
                  ended: trio.Event, name: str) -> None:
    """Lines of stdout → JSON-RPC messages for the session; EOF ends the connection."""
    assert proc.stdout is not None
    buffer = b""
    try:
        async with to_session:
            while chunk := await proc.stdout.receive_some(_READ):
                *lines, buffer = (buffer + chunk).split(b"\n")
                if len(buffer) > MAX_LINE:
                    log.warning("mcp server %r sent a message over %d MiB: disconnecting",
                                name, MAX_LINE >> 20)
                    return
                for line in lines:
                    if line.strip():
                        await to_session.send(_parse(line, name))
    except (trio.ClosedResourceError, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        ended.set()


def _parse(line: bytes, name: str) -> SessionMessage | Exception:
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line,
                                                                               by_name=False))
    except ValueError as exc:
        log.warning("mcp server %r wrote a line that is not JSON-RPC: %s", name,
                    one_line(line.decode("utf-8", "replace"), 120))
        return exc


async def _stdin(proc: trio.Process,
                 from_session: ObjectReceiveStream[SessionMessage]) -> None:
    assert proc.stdin is not None
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        async with from_session:
            async for message in from_session:
                data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                await proc.stdin.send_all(data.encode() + b"\n")


async def _stderr(proc: trio.Process, name: str) -> None:
    """The server's stderr, a line at a time, to the log (cut long lines, never blocking it)."""
    assert proc.stderr is not None
    buffer = b""
    with suppress(trio.ClosedResourceError):
        while chunk := await proc.stderr.receive_some(_READ):
            *lines, buffer = (buffer + chunk).split(b"\n")
            buffer = buffer[-STDERR_LINE * 4:]
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    log.info("mcp %s: %s", name, one_line(text, STDERR_LINE))
