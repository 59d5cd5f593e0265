"""One connection (one service session): uplink, downlink, tool results, and its watchers.

The uplink sends the session config, the context of earlier sessions, then microphone frames
and the downlink's control events; when the source ends it waits until the conversation is
settled and closes. The downlink feeds server events to the :class:`Conversation` and hands
its actions to :class:`Effects`. Tool results come back from the run's tool runner. Whichever
notices the end first cancels the others.

How it ended is one :class:`~r2d2voice.protocol.core.EndReason`, set once: the protocol core
decides fatal closes and errors (3000 bad key, 1013 no quota, 4000 bad request/model — exit 3)
and ``session_expired`` (a new session at once); this shell says when we closed it (done,
recycle, hang-up) and when the link died (a ping unanswered); anything else is a lost link,
retried with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.link import timers
from r2d2voice.link.effects import Effects
from r2d2voice.link.parts import LinkParts
from r2d2voice.link.state import LinkState
from r2d2voice.link.tools import ToolJob, ToolNews, ToolPrompt, ToolsOffered
from r2d2voice.link.transport import LinkClosed, Transport
from r2d2voice.protocol.actions import ClientEvent, Record
from r2d2voice.protocol.core import End, EndReason, LocalProtocolError

log = logging.getLogger("r2d2voice.link.connection")

#: control events (truncate, delete, …) waiting for the uplink; when full the downlink waits
CONTROL_BOUND = 16
#: at most this many queued 20 ms frames are sent in one ``input_audio_buffer.append``
MAX_APPEND_FRAMES = 10
#: deadline of every shielded step on the way out (closing a socket, flushing records)
CLOSE_DEADLINE = 1.0
FLUSH_DEADLINE = 3.0
#: how long our close waits for the service to answer what the core sends on the way out
#: (GPT-Live's ``session.close`` -> ``session.closed`` with the final usage)
GOODBYE_DEADLINE = 2.0


@dataclass
class FrameFeed:
    """The microphone frames, across connections."""

    frames: trio.MemoryReceiveChannel[bytes]
    #: frames queued for a dead link are stale: live audio, or a source that resends turns
    drop_stale: bool
    live: bool
    carry: bytes | None = None  # taken but not sent when a link died (a replay resends it)
    #: speech heard while no session was open (after a hang-up): sent first to the next one
    preroll: list[bytes] = field(default_factory=list)
    done: bool = False

    def drop_queued(self) -> int:
        """Throw away what waited while there was no link; return how many frames."""
        dropped = 1 if self.carry is not None else 0
        self.carry = None
        while True:
            try:
                self.frames.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return dropped
            dropped += 1


@dataclass
class ToolPorts:
    """The run's tool runner as a connection sees it (both ends borrowed)."""

    calls: trio.MemorySendChannel[ToolJob]
    results: trio.MemoryReceiveChannel[ToolNews]


class Connection:
    """Runs the tasks of one connection until it ends; see :meth:`run`."""

    def __init__(self, transport: Transport, state: LinkState, parts: LinkParts,
                 session_id: str, *, tools: ToolPorts) -> None:
        self.transport = transport
        self.state = state
        self.conv = state.conversation
        self.epoch = state.epoch
        self.parts = parts
        self.policy = parts.policy
        self.session_id = session_id
        self.tools = tools
        #: the downlink is over (the service closed, or the link died)
        self._over = trio.Event()

    async def run(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> EndReason:
        """All tasks of this connection; returns how it ended once it is closed. Owns the
        control channel."""
        control_send, control_recv = trio.open_memory_channel[ClientEvent](CONTROL_BOUND)
        effects = Effects(self.state, self.session_id, self.parts, audio, records,
                          control_send, self.tools.calls, self.epoch)
        state, policy = self.state, self.policy
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._uplink, feed, control_recv)
            nursery.start_soon(self._downlink, effects, nursery.cancel_scope)
            nursery.start_soon(self._tool_results, effects)
            nursery.start_soon(timers.keepalive, self.transport, policy, self.finish)
            nursery.start_soon(timers.recycle, state, policy, self.finish)
            nursery.start_soon(timers.give_up_transcripts, state, policy)
            nursery.start_soon(timers.hang_up, effects, self.finish)
            nursery.start_soon(timers.status, state, self.parts)
            nursery.start_soon(timers.tick, state, effects)
        return self.conv.end or EndReason(End.DONE)

    async def finish(self, reason: EndReason) -> None:
        """End this connection for ``reason`` (unless it has already ended) and close it. What
        the core sends on the way out goes first, and the service's answer is waited for
        (shielded, at most :data:`GOODBYE_DEADLINE`): the downlink stores it."""
        goodbye = self.conv.finish(reason)
        if goodbye and not self._over.is_set():
            with trio.move_on_after(GOODBYE_DEADLINE) as scope:
                scope.shield = True
                try:
                    for message in goodbye:
                        await self.transport.send(message)
                    await self._over.wait()
                except LinkClosed:
                    pass
            if scope.cancelled_caught:
                log.info("the service did not close the session within %.0f s of our close",
                         GOODBYE_DEADLINE)
        await self._close()

    async def _send(self, event: ClientEvent) -> None:
        await self._wire(lambda: self.conv.send(event))

    async def _wire(self, message: Callable[[], str]) -> None:
        """Send what the core made of something; LinkClosed if the core says it is closed."""
        try:
            text = message()
        except LocalProtocolError:
            raise LinkClosed("closed") from None
        await self.transport.send(text)

    # -- uplink ------------------------------------------------------------------------------
    async def _uplink(self, feed: FrameFeed,
                      control: trio.MemoryReceiveChannel[ClientEvent]) -> None:
        async with control, trio.open_nursery() as nursery:
            try:
                opening = self.conv.opening()
                for message in opening:
                    await self.transport.send(message)
                if len(opening) > 1:
                    log.info("re-sent %d turns of context to the new session", len(opening) - 1)
                await self.state.watch.wait_for(lambda: self.conv.audio_ready)
                nursery.start_soon(self._forward, control)
                await self._frames(feed)
                if not self.state.stopping:
                    await self._wait_settled()
            except LinkClosed:
                nursery.cancel_scope.cancel()
                return
            nursery.cancel_scope.cancel()
        await self.finish(EndReason(End.DONE, "stopping" if self.state.stopping
                                    else "input ended"))

    async def _audio(self, pcm: bytes) -> None:
        await self._wire(lambda: self.conv.audio(pcm))

    async def _forward(self, control: trio.MemoryReceiveChannel[ClientEvent]) -> None:
        try:
            async for event in control:
                await self._send(event)
        except LinkClosed:
            return

    async def _frames(self, feed: FrameFeed) -> None:
        """Frames → ``input_audio_buffer.append`` until the source ends; LinkClosed if the
        link dies first (a replay keeps the unsent chunk in ``feed.carry``)."""
        state = self.state
        if feed.preroll:
            preroll, feed.preroll = feed.preroll, []
            await self._audio(b"".join(preroll))
            state.stats.frames_sent += len(preroll)
        if feed.carry is not None:
            await self._audio(feed.carry)
            feed.carry = None
        while not feed.done:
            try:
                queued = [await feed.frames.receive()]
            except trio.EndOfChannel:
                feed.done = True
                return
            # frames already waiting (a fast replay, a link catching up) go out in one append;
            # live frames arriving one by one are sent as they come
            while len(queued) < MAX_APPEND_FRAMES:
                try:
                    queued.append(feed.frames.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    feed.done = True
                    break
            out = queued
            chunk = b"".join(out)
            sent = False
            try:
                await self._audio(chunk)
                sent = True
            finally:  # the link died (or this connection was cancelled) with the chunk in hand
                if sent:
                    state.stats.frames_sent += len(out)
                elif not feed.drop_stale:  # a replay loses nothing: resend it
                    feed.carry = chunk
                elif feed.live:
                    state.stats.frames_dropped += len(out)

    async def _wait_settled(self) -> None:
        """Until nothing is open (no speech, no reply, no tool, every transcript in or given
        up) for ``settle_seconds`` in a row: the service may still be deciding about the
        tail."""
        state = self.state

        def settled() -> bool:
            return state.stopping or self.conv.settled

        while not state.stopping:
            await state.watch.wait_for(settled)
            with trio.move_on_after(self.parts.settle_seconds) as quiet:
                await state.watch.wait_for(lambda: not settled())
            if quiet.cancelled_caught:
                return

    # -- downlink ----------------------------------------------------------------------------
    async def _downlink(self, effects: Effects, scope: trio.CancelScope) -> None:
        """Server events → conversation → actions. Owns the control channel's send end."""
        state, conv = self.state, self.conv
        code: int | None = None
        reason = "closed"
        async with effects.control:
            try:
                while conv.end is None or conv.end.kind is not End.FATAL:
                    try:
                        message = await self.transport.receive()
                    except LinkClosed as exc:
                        code, reason = exc.code, exc.reason
                        return
                    await self._event(message, effects)
            finally:
                if state.stopping:  # whatever the transport says now, we ended it
                    conv.finish(EndReason(End.DONE, "stopping"))
                with trio.move_on_after(FLUSH_DEADLINE) as flush:
                    flush.shield = True
                    await effects.apply([*effects.played_latencies(),
                                         *conv.connection_lost(code, reason)])
                    state.moments.connection_over()
                    self._log_end()
                if flush.cancelled_caught:
                    log.error("the recorder took no records for %.0f s: partial transcripts "
                              "of this session are lost", FLUSH_DEADLINE)
                state.watch.changed()
                # this connection is over: stop its uplink, keepalive and timers too
                self._over.set()
                scope.cancel()
                await self._close()

    def _log_end(self) -> None:
        end = self.conv.end
        if end is not None and end.kind in (End.LOST, End.EXPIRED):
            level = logging.INFO if end.kind is End.EXPIRED else logging.WARNING
            log.log(level, "connection to the service lost: %s", end.detail)

    async def _event(self, message: str | bytes, effects: Effects) -> None:
        conv = self.conv
        configured = conv.configured
        await effects.apply(conv.receive(message, trio.current_time()))
        await effects.apply(effects.played_latencies())
        if conv.configured and not configured:
            self.state.moments.configured()
            if self.parts.on_configured:
                self.parts.on_configured()

    # -- tool results --------------------------------------------------------------------------
    async def _tool_results(self, effects: Effects) -> None:
        """Outputs of finished tools go to the session that asked, if it is this one; a result
        for an ended session is only recorded. A running call's prompt goes to its session;
        a change of the tools on offer to the session there is."""
        while True:
            done = await self.tools.results.receive()
            if isinstance(done, ToolsOffered):
                await effects.apply(self.conv.tools_offered(done.tools))
                continue
            if isinstance(done, ToolPrompt):
                if done.job.epoch == self.epoch:
                    await effects.apply(self.conv.tool_says(done.text))
                continue
            with trio.move_on_after(FLUSH_DEADLINE) as deliver:
                deliver.shield = True  # a received result is never lost to a cancel
                if done.job.epoch == self.epoch:
                    await effects.apply(self.conv.tool_finished(done.result,
                                                                hang_up=done.job.hang_up))
                else:
                    log.warning("tool %s (call %s) finished after its session ended: output "
                                "not delivered", done.job.call.name, done.job.call.call_id)
                    await effects.store(done.result, done.job.session_id)
            if deliver.cancelled_caught:
                log.error("tool %s (call %s): its result could not be recorded",
                          done.job.call.name, done.job.call.call_id)

    async def _close(self) -> None:
        with trio.move_on_after(CLOSE_DEADLINE) as scope:
            scope.shield = True
            await self.transport.aclose()
