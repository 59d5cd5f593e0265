"""One connection (one service session): uplink, downlink, tool results, and its watchers.

The uplink sends the session config, the context of earlier sessions, then microphone frames
and the downlink's control events; when the source ends it waits until the conversation is
settled and closes. The downlink feeds server events to the :class:`Conversation` and hands
its actions to :class:`Effects`. Tool results come back from the run's tool runner. Whichever
notices the end first cancels the others.

How the service ends a connection decides what comes next (:class:`Ending`): a fatal close
(3000 bad key, 1013 no quota, 4000 bad request/model — with or without an ``error`` first) ends
the run with exit 3; ``session_expired`` starts a new session at once; anything else is a lost
link, retried with backoff.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.errors import ConfigError
from r2d2voice.link import timers
from r2d2voice.link.effects import Effects
from r2d2voice.link.state import Console, LinkPolicy, LinkState
from r2d2voice.link.tools import ToolDone, ToolJob, ToolOffer, ToolPrompt
from r2d2voice.link.transport import LinkClosed, Transport
from r2d2voice.protocol.actions import Record, StoreError
from r2d2voice.realtime.client_events import (
    AudioAppend,
    ClientEvent,
    ItemCreateText,
    SessionConfig,
    SessionUpdate,
    ToolsUpdate,
)
from r2d2voice.realtime.conversation import LocalProtocolError
from r2d2voice.realtime.server_events import (
    Ignored,
    ProtocolError,
    ServiceError,
    SessionUpdated,
    parse_event,
)

log = logging.getLogger("r2d2voice.link.connection")

#: control events (truncate, delete, …) waiting for the uplink; when full the downlink waits
CONTROL_BOUND = 16
#: at most this many queued 20 ms frames are sent in one ``input_audio_buffer.append``
MAX_APPEND_FRAMES = 10
#: deadline of every shielded step on the way out (closing a socket, flushing records)
CLOSE_DEADLINE = 1.0
FLUSH_DEADLINE = 3.0
#: close codes after which no retry can help (exit 3), and what they mean
FATAL_CLOSE_CODES = {
    3000: "the API key was refused",
    1013: "no quota left (check the plan and billing)",
    4000: "the request was refused (check the model name)",
}


@dataclass
class Ending:
    """How one connection ended."""

    session_id: str
    closing: bool = False  # we closed it: source done, or stopping
    recycle: bool = False  # we closed it to start a fresh session
    hangup: bool = False  # we closed it after the goodbye (end_conversation)
    expired: bool = False  # the service ended the session at its time limit
    lost: str | None = None
    fatal: ConfigError | None = None


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
    results: trio.MemoryReceiveChannel[ToolDone | ToolPrompt]
    #: the tools offered now, and more (None: those of the session config, fixed)
    offer: ToolOffer | None = None


class Connection:
    """Runs the tasks of one connection until it ends; see :meth:`run`."""

    def __init__(self, transport: Transport, state: LinkState, policy: LinkPolicy,
                 ending: Ending, console: Console, *, config: SessionConfig,
                 context: list[tuple[str, str]], settle_seconds: float,
                 on_configured: Callable[[], None] | None, tools: ToolPorts) -> None:
        self.transport = transport
        self.state = state
        self.conv = state.conversation
        self.epoch = state.epoch
        self.policy = policy
        self.ending = ending
        self.console = console
        self.config = config
        self.context = context
        self.settle_seconds = settle_seconds
        self.on_configured = on_configured
        self.tools = tools

    async def run(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> Ending:
        """All tasks of this connection; returns once it is closed. Owns the control channel."""
        control_send, control_recv = trio.open_memory_channel[ClientEvent](CONTROL_BOUND)
        offer = self.tools.offer
        effects = Effects(self.state, self.ending.session_id, self.console, audio, records,
                          control_send, self.tools.calls, self.epoch,
                          heard=offer.heard if offer is not None else None)
        state, policy, ending = self.state, self.policy, self.ending
        async with trio.open_nursery() as nursery:
            if offer is not None:  # the tools as they are now; a change is sent as it comes
                version = offer.version
                self.config = replace(self.config, tools=offer.session_tools())
                nursery.start_soon(self._offer_tools, offer, version, control_send.clone())
            nursery.start_soon(self._uplink, feed, control_recv)
            nursery.start_soon(self._downlink, effects, nursery.cancel_scope)
            nursery.start_soon(self._tool_results, effects)
            nursery.start_soon(timers.keepalive, self.transport, policy, ending, self._close)
            nursery.start_soon(timers.recycle, state, policy, ending, self._close)
            nursery.start_soon(timers.give_up_transcripts, state, policy)
            nursery.start_soon(timers.hang_up, effects, ending, self._close)
            nursery.start_soon(timers.status, state, self.console)
        return self.ending

    async def _offer_tools(self, offer: ToolOffer, version: int,
                           control: trio.MemorySendChannel[ClientEvent]) -> None:
        """A ``session.update`` of the tools whenever they change (an MCP server came, went
        or changed its list)."""
        async with control:
            while True:
                await offer.changed(version)
                version = offer.version
                try:
                    await control.send(ToolsUpdate(offer.session_tools()))
                except trio.BrokenResourceError:
                    return

    async def _send(self, event: ClientEvent) -> None:
        try:
            message = self.conv.send(event)
        except LocalProtocolError:
            raise LinkClosed("closed") from None
        await self.transport.send(message)

    # -- uplink ------------------------------------------------------------------------------
    async def _uplink(self, feed: FrameFeed,
                      control: trio.MemoryReceiveChannel[ClientEvent]) -> None:
        async with control, trio.open_nursery() as nursery:
            try:
                await self._send(SessionUpdate(self.config))
                for role, text in self.context:
                    await self._send(ItemCreateText(role, text))
                if self.context:
                    log.info("re-sent %d turns of context to the new session", len(self.context))
                nursery.start_soon(self._forward, control)
                await self._frames(feed)
                if not self.state.stopping:
                    await self._wait_settled()
            except LinkClosed:
                nursery.cancel_scope.cancel()
                return
            nursery.cancel_scope.cancel()
        self.ending.closing = True
        await self._close()

    async def _forward(self, control: trio.MemoryReceiveChannel[ClientEvent]) -> None:
        try:
            async for event in control:
                await self._send(event)
        except LinkClosed:
            return

    async def _frames(self, feed: FrameFeed) -> None:
        """Frames → ``input_audio_buffer.append`` until the source ends; LinkClosed if the
        link dies first (a replay keeps the unsent chunk in ``feed.carry``)."""
        state, gate = self.state, self.state.gate
        if feed.preroll:
            preroll, feed.preroll = feed.preroll, []
            await self._send(AudioAppend(b"".join(preroll)))
            state.stats.frames_sent += len(preroll)
        if feed.carry is not None:
            await self._send(AudioAppend(feed.carry))
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
            out: list[bytes] = []
            for frame in queued:
                if gate is None:
                    out.append(frame)
                    continue
                passed = gate.filter(frame, trio.current_time(),
                                     state.buffer.queued_samples() > 0)
                if not passed:
                    state.stats.frames_gated += 1
                out += passed
            if not out:
                continue
            chunk = b"".join(out)
            sent = False
            try:
                await self._send(AudioAppend(chunk))
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
            with trio.move_on_after(self.settle_seconds) as quiet:
                await state.watch.wait_for(lambda: not settled())
            if quiet.cancelled_caught:
                return

    # -- downlink ----------------------------------------------------------------------------
    async def _downlink(self, effects: Effects, scope: trio.CancelScope) -> None:
        """Server events → conversation → actions. Owns the control channel's send end."""
        state, ending = self.state, self.ending
        async with effects.control:
            try:
                while ending.fatal is None:
                    try:
                        message = await self.transport.receive()
                    except LinkClosed as exc:
                        await self._closed(exc, effects)
                        return
                    await self._event(message, effects)
            finally:
                with trio.move_on_after(FLUSH_DEADLINE) as flush:
                    flush.shield = True
                    await effects.apply([*effects.played_latencies(),
                                         *self.conv.connection_lost()])
                if flush.cancelled_caught:
                    log.error("the recorder took no records for %.0f s: partial transcripts "
                              "of this session are lost", FLUSH_DEADLINE)
                state.watch.changed()
                # this connection is over: stop its uplink, keepalive and timers too
                scope.cancel()
                await self._close()

    async def _closed(self, exc: LinkClosed, effects: Effects) -> None:
        """The service (or we) closed the connection: say why, once."""
        ending = self.ending
        ours = self.state.stopping or ending.closing or ending.recycle or ending.hangup
        if exc.code in FATAL_CLOSE_CODES and not ours and ending.fatal is None:
            error = self.conv.last_error
            said = f": {error.message}" if error is not None else ""
            ending.fatal = ConfigError(
                f"the Realtime service closed the connection with code {exc.code} "
                f"({FATAL_CLOSE_CODES[exc.code]}){said}")
            await effects.store(StoreError("connection_closed", str(exc.code),
                                           str(ending.fatal), True))
            return
        if not (ours or ending.lost):
            ending.lost = exc.reason
        if ending.lost:
            level = logging.INFO if ending.expired else logging.WARNING
            log.log(level, "connection to the Realtime service lost: %s", ending.lost)
            await effects.store(StoreError("connection_lost", None, ending.lost, False))

    async def _event(self, message: str | bytes, effects: Effects) -> None:
        state, ending, conv = self.state, self.ending, self.conv
        try:
            event = parse_event(message)
        except ProtocolError as exc:
            state.stats.junk_messages += 1
            log.debug("ignored: %s", exc)
            return
        if isinstance(event, Ignored):
            log.debug("ignored event %s", event.type)
            return
        leftovers = conv.leftover_deltas
        await effects.apply(conv.receive(event, trio.current_time()))
        offer = self.tools.offer
        if offer is not None and isinstance(message, str) and '"mcp' in message:
            # the service's own MCP items (remote servers): audit records, approval requests
            await effects.apply(offer.service_event(json.loads(message), conv.items.seq))
        await effects.apply(effects.played_latencies())
        state.stats.leftover_deltas += conv.leftover_deltas - leftovers
        if isinstance(event, SessionUpdated) and self.on_configured:
            self.on_configured()
        if isinstance(event, ServiceError):
            if event.benign:
                state.stats.benign_errors += 1
                log.info("service: %s (%s), going on", event.message, event.code)
            elif event.fatal:
                ending.fatal = ConfigError(f"the Realtime service refused: {event.message}"
                                           + (f" ({event.code})" if event.code else ""))
            elif event.ends_session:
                ending.lost = f"session ended by the service ({event.code})"
                ending.expired = True

    # -- tool results --------------------------------------------------------------------------
    async def _tool_results(self, effects: Effects) -> None:
        """Outputs of finished tools go to the session that asked, if it is this one; a result
        for an ended session is only recorded."""
        while True:
            done = await self.tools.results.receive()
            if isinstance(done, ToolPrompt):  # a waiting call has the model ask the person
                if done.job.epoch == self.epoch:
                    await effects.apply(self.conv.add_item(ItemCreateText("system", done.text)))
                continue
            offer = self.tools.offer
            with trio.move_on_after(FLUSH_DEADLINE) as deliver:
                deliver.shield = True  # a received result is never lost to a cancel
                approval = offer.answer(done.result) if offer is not None else None
                if approval is not None and done.job.epoch == self.epoch:
                    event, record = approval  # the service's MCP approval request answered
                    await effects.apply([*([record] if record else []),
                                         *self.conv.add_item(event)])
                elif done.job.epoch == self.epoch:
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
