"""The local backend's GPT-Live mode (``/v1/live/sessions``) on one websocket: a nursery of
tasks around a :class:`~r2d2voice.localbackend.live_session.LiveLocal`.

- the reader: client messages -> session -> events (to the sender) and replies (to the speaker);
- the speaker: streams one reply at a time, paced on trio's clock at
  ``BackendConfig.realtime_factor``, each in its own cancel scope (a :class:`Hush` cancels it:
  the person talked over it); the beeps are made in a worker thread;
- the sender: the only writer of messages; a :class:`Hangup` closes the websocket (or resets
  the TCP connection) once what was queued before it went out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import trio
import trio_websocket

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.connection import (
    ABORT_DELAY_S,
    CLOSE_TIMEOUT_S,
    OUTGOING_BUFFER,
    REPLY_BUFFER,
    abort,
)
from r2d2voice.localbackend.live_reply import LiveReply
from r2d2voice.localbackend.live_session import Hangup, Hush, LiveLocal, Output, Speak
from r2d2voice.localbackend.outputs import Tick
from r2d2voice.localbackend.reply import synthesize
from r2d2voice.localbackend.wire import Json

__all__ = ["LIVE_PATH", "is_live", "serve_live"]

log = logging.getLogger("r2d2voice.localbackend.server")

LIVE_PATH = "/v1/live/sessions"

Outgoing = Json | Hangup
Streaming = tuple[LiveReply, trio.CancelScope]


def is_live(path: str) -> bool:
    """Whether a request path asks for a GPT-Live session (``/v1/live/sessions``)."""
    return path.split("?", 1)[0].rstrip("/").endswith(LIVE_PATH)


async def serve_live(ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream,
                     config: BackendConfig) -> None:
    """One GPT-Live connection, until the client or a :class:`Hangup` ends it."""
    session = LiveLocal(clock=time.time, reply_seconds=config.effective_reply_seconds,
                        faults=config.faults, script=config.script, observer=config.observer)
    log.info("live session %s opened", session.id)
    await _Live(ws, stream, session, config).run()
    log.info("live session %s over", session.id)


class _Live:
    def __init__(self, ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream,
                 session: LiveLocal, config: BackendConfig) -> None:
        self.ws, self.stream, self.session, self.config = ws, stream, session, config
        self._scopes: dict[int, trio.CancelScope] = {}  # id(reply) -> its streaming scope

    async def run(self) -> None:
        out, out_recv = trio.open_memory_channel[Outgoing](OUTGOING_BUFFER)
        replies, replies_recv = trio.open_memory_channel[Streaming](REPLY_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, out_recv)
            nursery.start_soon(self._speak_loop, replies_recv, out.clone())
            with contextlib.suppress(trio.BrokenResourceError):
                await self._read_loop(out, replies)
            nursery.cancel_scope.cancel()

    async def _dispatch(self, outputs: list[Output], out: trio.MemorySendChannel[Outgoing],
                        replies: trio.MemorySendChannel[Streaming] | None) -> None:
        for output in outputs:
            if isinstance(output, Speak) and replies is not None:
                scope = self._scopes[id(output.reply)] = trio.CancelScope()
                await replies.send((output.reply, scope))
            elif isinstance(output, Hush):
                scope = self._scopes.get(id(output.reply))
                if scope is not None:
                    scope.cancel()
            elif not isinstance(output, Speak):
                await out.send(output)

    async def _read_loop(self, out: trio.MemorySendChannel[Outgoing],
                         replies: trio.MemorySendChannel[Streaming]) -> None:
        async with out, replies:
            while True:
                try:
                    message = await self.ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return
                await self._dispatch(self.session.receive(message), out, replies)

    async def _speak_loop(self, replies: trio.MemoryReceiveChannel[Streaming],
                          out: trio.MemorySendChannel[Outgoing]) -> None:
        """Stream replies one at a time; each, however it ended, is reported done."""
        factor = self.config.realtime_factor
        async with replies, out:
            with contextlib.suppress(trio.BrokenResourceError):
                async for reply, scope in replies:
                    with scope:
                        if self.config.faults.reply_delay_s > 0:
                            await trio.sleep(self.config.faults.reply_delay_s)
                        beeps = await trio.to_thread.run_sync(
                            synthesize, reply.seed, reply.seconds, abandon_on_cancel=True)
                        start = trio.current_time()
                        for step in reply.steps(beeps, self.config.chunk_ms_range):
                            if isinstance(step, Tick):
                                await trio.sleep_until(start + step.at_ms / 1000 / factor)
                            else:
                                await out.send(step)
                                reply.sent(step)
                    self._scopes.pop(id(reply), None)
                    log.info("live reply %s after %.2f s of audio", "stopped" if reply.hushed
                             else "done", reply.audio_ms / 1000)
                    await self._dispatch(self.session.reply_done(reply), out, None)

    async def _send_loop(self, messages: trio.MemoryReceiveChannel[Outgoing]) -> None:
        """The only writer of messages; a :class:`Hangup` ends the connection."""
        async with messages:
            async for message in messages:
                if isinstance(message, Hangup):
                    log.info("live session %s: %s", self.session.id, message.reason)
                    if message.abort:
                        await trio.sleep(ABORT_DELAY_S)  # let what was sent arrive first
                        await abort(self.stream)
                    else:
                        with trio.move_on_after(CLOSE_TIMEOUT_S):
                            await self.ws.aclose(message.code, message.reason)
                    return
                try:
                    await self.ws.send_message(json.dumps(message))
                except trio_websocket.ConnectionClosed:
                    return
