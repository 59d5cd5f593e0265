"""One websocket connection of the local backend: a nursery of tasks around a LocalSession.

- the reader: client messages -> session -> events (to the sender) and replies (to the replier);
- the replier: streams one reply at a time, each in its own cancel scope;
- the sender: the only writer of messages (pings aside: control frames, trio-websocket
  serializes them); it applies the after-N-responses faults and :class:`Close` requests;
- the idle watcher: ``idle_timeout_ms`` on trio's clock, restarted whenever the session's
  ``idle_epoch`` moves;
- with the faults that need them: the session timer (``session_minutes``), the pinger
  (``server_ping_s``), and one short task per late transcription (``Later``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import struct
from collections.abc import Awaitable
from dataclasses import dataclass

import trio
import trio_websocket

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.fault_events import session_expired
from r2d2voice.localbackend.reply import Reply
from r2d2voice.localbackend.session import CancelReply, Later, LocalSession, Output
from r2d2voice.localbackend.streaming import Outgoing, stream_reply
from r2d2voice.localbackend.wire import EventMaker, random_id

__all__ = ["Close", "Connection"]

log = logging.getLogger("r2d2voice.localbackend.connection")

CLOSE_TIMEOUT_S = 1.0
OUTGOING_BUFFER = 64
"""Server events queued for the sender. Policy: wait (producers block; nothing is dropped)."""

REPLY_BUFFER = 2
"""Replies queued for the replier (one finishing after a cancel + the next). Policy: wait."""

ABORT_DELAY_S = 0.2
"""Pause between the Nth ``response.done`` and the reset (``Faults.abort_after_responses``)."""

Streaming = tuple[Reply, trio.CancelScope]
"""A reply and the scope that cancels its streaming (made by the dispatcher, entered by the
replier)."""


@dataclass(frozen=True)
class Close:
    """For the sender: close the websocket with ``code`` (what was queued before goes first)."""

    code: int
    reason: str


async def abort(stream: trio.abc.Stream) -> None:
    """Reset the TCP connection: no close frame, no FIN (SO_LINGER 0 makes close send RST)."""
    if isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


class Connection:
    """The tasks of one accepted websocket; :meth:`run` returns when the connection ends."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream,
                 session: LocalSession, config: BackendConfig) -> None:
        self.ws = ws
        self.stream = stream
        self.session = session
        self.config = config
        self._current: Streaming | None = None  # the latest reply: the one a cancel can name
        self._changed = trio.Event()  # set (and replaced) when session.idle_epoch moves
        self._epoch = session.idle_epoch
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        faults = self.config.faults
        out, out_recv = trio.open_memory_channel[Outgoing | Close](OUTGOING_BUFFER)
        replies, replies_recv = trio.open_memory_channel[Streaming](REPLY_BUFFER)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._send_loop, out_recv)
            nursery.start_soon(self._reply_loop, replies_recv, out.clone())
            nursery.start_soon(self._idle_loop, out.clone(), replies.clone())
            if faults.session_minutes is not None:
                nursery.start_soon(self._expire, out.clone(), faults.session_minutes)
            if faults.server_ping_s is not None:
                nursery.start_soon(self._ping_loop, faults.server_ping_s)
            await _until_broken(self._read_loop(out, replies))
            nursery.cancel_scope.cancel()

    # -- dispatch ------------------------------------------------------------------------

    async def _dispatch(self, actions: list[Output], out: trio.MemorySendChannel[Outgoing],
                        replies: trio.MemorySendChannel[Streaming]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                self._current = (action, trio.CancelScope())
                await replies.send(self._current)
            elif isinstance(action, CancelReply):
                if self._current is not None and self._current[0] is action.reply:
                    self._current[1].cancel()
            elif isinstance(action, Later):
                assert self._nursery is not None
                self._nursery.start_soon(self._send_later, action, out.clone())
            else:
                if action["type"] == "error":
                    log.info("client error: %s (%s)", action["error"]["message"],
                             action["error"]["code"])
                await out.send(action)
        self._notify()

    def _notify(self) -> None:
        """Wake the idle watcher if the session's idle time started over."""
        if self.session.idle_epoch != self._epoch:
            self._epoch = self.session.idle_epoch
            self._changed.set()
            self._changed = trio.Event()

    # -- tasks ---------------------------------------------------------------------------

    async def _read_loop(self, out: trio.MemorySendChannel[Outgoing],
                         replies: trio.MemorySendChannel[Streaming]) -> None:
        warned_full = False
        async with out, replies:
            await out.send(self.session.created())
            while True:
                try:
                    message = await self.ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return
                await self._dispatch(self.session.receive(message), out, replies)
                if self.session.input.dropped_samples and not warned_full:
                    warned_full = True
                    log.warning("input audio buffer full (15 MiB): dropping the oldest audio")

    async def _reply_loop(self, replies: trio.MemoryReceiveChannel[Streaming],
                          out: trio.MemorySendChannel[Outgoing]) -> None:
        """Stream replies one at a time; a cancelled reply still gets its closing events."""
        async with replies, out:
            with contextlib.suppress(trio.BrokenResourceError):  # the sender is gone
                async for reply, scope in replies:
                    await stream_reply(self.session, reply, out, self.config, scope)
                    self._notify()

    async def _idle_loop(self, out: trio.MemorySendChannel[Outgoing],
                         replies: trio.MemorySendChannel[Streaming]) -> None:
        """``idle_timeout_ms``: no speech that long (restarted on every change) -> the nudge."""
        async with out, replies:
            while True:
                timeout = self.session.idle_timeout_s
                changed = self._changed
                with trio.move_on_after(math.inf if timeout is None else timeout) as waited:
                    await changed.wait()
                if waited.cancelled_caught:
                    await _until_broken(self._dispatch(self.session.on_idle(), out, replies))

    async def _send_later(self, later: Later, out: trio.MemorySendChannel[Outgoing]) -> None:
        async with out:
            await trio.sleep(later.delay_s)
            for event in later.events:
                await _until_broken(out.send(event))

    async def _expire(self, out: trio.MemorySendChannel[Outgoing | Close],
                      minutes: float) -> None:
        async with out:
            await trio.sleep(minutes * 60)
            log.info("session %s expired after %g minutes", self.session.id, minutes)
            await _until_broken(out.send(session_expired(self.session.event, minutes)))
            await _until_broken(out.send(Close(1001, "session expired")))

    async def _ping_loop(self, interval: float) -> None:
        n = 0
        while True:
            await trio.sleep(interval)
            n += 1
            with trio.move_on_after(interval):  # no pong in time: try again next round
                try:
                    await self.ws.ping(f"{n:08d}".encode())
                except trio_websocket.ConnectionClosed:
                    return

    async def _send_loop(self, messages: trio.MemoryReceiveChannel[Outgoing | Close]) -> None:
        """The only writer of messages; applies the after-N-responses faults."""
        faults = self.config.faults
        done = 0
        async with messages:
            async for message in messages:
                if isinstance(message, Close):
                    await self._close(message.code, message.reason)
                    return
                data = message if isinstance(message, (str, bytes)) else json.dumps(message)
                try:
                    await self.ws.send_message(data)
                except trio_websocket.ConnectionClosed:
                    return
                if not (isinstance(message, dict) and message.get("type") == "response.done"):
                    continue
                done += 1
                fault = faults.after_response(done)
                if fault is None:
                    continue
                log.info("fault: %s after %d responses", fault, done)
                if fault == "abort":
                    # A reset discards whatever the peer's kernel has not handed to it yet;
                    # wait a moment so the reply itself arrives and the blip hits between turns.
                    await trio.sleep(ABORT_DELAY_S)
                    await abort(self.stream)
                    return
                if fault == "expire":
                    expired = session_expired(EventMaker(random_id))
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await self.ws.send_message(json.dumps(expired))
                    await self._close(1000, "session expired")
                    return
                await self._close(faults.close_code, "local backend fault injection")
                return

    async def _close(self, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self.ws.aclose(code, reason)


async def _until_broken(work: Awaitable[None]) -> None:
    """Await ``work``; a closed sender (the connection is ending) just ends it."""
    with contextlib.suppress(trio.BrokenResourceError):
        await work

