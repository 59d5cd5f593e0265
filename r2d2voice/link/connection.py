"""One connection (one service session): uplink, downlink, keepalive, recycle timer, status.

The uplink sends the session config, the context of earlier sessions, then microphone frames
and the downlink's control events; when the source ends it waits until the conversation is
settled and closes. The downlink feeds server events to the :class:`Conversation` and hands
its actions to :class:`Effects`. Whichever notices the end first cancels the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.errors import ConfigError
from r2d2voice.link.effects import Effects
from r2d2voice.link.state import Console, LinkPolicy, LinkState
from r2d2voice.link.transport import LinkClosed, Transport
from r2d2voice.realtime.actions import Record, StoreError
from r2d2voice.realtime.client_events import (
    AudioAppend,
    ClientEvent,
    ItemCreateText,
    SessionConfig,
    SessionUpdate,
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


@dataclass
class Ending:
    """How one connection ended."""

    session_id: str
    closing: bool = False  # we closed it: source done, or stopping
    recycle: bool = False  # we closed it to start a fresh session
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


class Connection:
    """Runs the tasks of one connection until it ends; see :meth:`run`."""

    def __init__(self, transport: Transport, state: LinkState, policy: LinkPolicy,
                 ending: Ending, console: Console, *, config: SessionConfig,
                 context: list[tuple[str, str]], settle_seconds: float,
                 on_configured: Callable[[], None] | None) -> None:
        self.transport = transport
        self.state = state
        self.conv = state.conversation
        self.policy = policy
        self.ending = ending
        self.console = console
        self.config = config
        self.context = context
        self.settle_seconds = settle_seconds
        self.on_configured = on_configured

    async def run(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> Ending:
        """All tasks of this connection; returns once it is closed. Owns the control channel."""
        control_send, control_recv = trio.open_memory_channel[ClientEvent](CONTROL_BOUND)
        effects = Effects(self.state, self.ending.session_id, self.console, audio, records,
                          control_send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._uplink, feed, control_recv)
            nursery.start_soon(self._downlink, effects, nursery.cancel_scope)
            nursery.start_soon(self._keepalive)
            nursery.start_soon(self._recycle_timer)
            nursery.start_soon(self._status)
        return self.ending

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
        """Until nothing is open (no speech, no reply, every transcript in) for
        ``settle_seconds`` in a row: the service may still be deciding about the tail."""
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
                        if not (state.stopping or ending.closing or ending.recycle
                                or ending.lost):
                            ending.lost = exc.reason
                        if ending.lost:
                            log.warning("connection to the Realtime service lost: %s",
                                        ending.lost)
                            await effects.store(StoreError("connection_lost", None,
                                                           ending.lost, False))
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

    async def _event(self, message: str | bytes, effects: Effects) -> None:
        state, ending = self.state, self.ending
        try:
            event = parse_event(message)
        except ProtocolError as exc:
            state.stats.junk_messages += 1
            log.debug("ignored: %s", exc)
            return
        if isinstance(event, Ignored):
            log.debug("ignored event %s", event.type)
            return
        await effects.apply(self.conv.receive(event, trio.current_time()))
        await effects.apply(effects.played_latencies())
        if isinstance(event, SessionUpdated) and self.on_configured:
            self.on_configured()
        if isinstance(event, ServiceError):
            if event.fatal:
                ending.fatal = ConfigError(f"the Realtime service refused: {event.message}"
                                           + (f" ({event.code})" if event.code else ""))
            elif event.ends_session:
                ending.lost = f"session ended by the service ({event.code})"

    # -- keepalive, recycling, status ---------------------------------------------------------
    async def _keepalive(self) -> None:
        """A ping the service does not answer in time means the link is dead."""
        while True:
            await trio.sleep(self.policy.ping_interval)
            with trio.move_on_after(self.policy.ping_timeout) as waited:
                try:
                    await self.transport.ping()
                except LinkClosed:
                    return
            if waited.cancelled_caught:
                self.ending.lost = "ping timeout"
                await self._close()
                return

    async def _recycle_timer(self) -> None:
        """Before the service's session limit, start a fresh session at a quiet moment: nothing
        open and no reply audio queued, for ``quiet_seconds`` in a row."""
        state = self.state
        await trio.sleep(self.policy.session_max_seconds)
        log.info("session limit near: recycling the connection at the next quiet moment")

        def quiet() -> bool:
            return self.conv.settled and state.buffer.queued_samples() == 0

        while True:
            await state.watch.wait_for(quiet)
            with trio.move_on_after(self.policy.quiet_seconds) as still:
                await state.watch.wait_for(lambda: not quiet())
            if still.cancelled_caught:
                break
        self.ending.recycle = True
        await self._close()

    async def _status(self) -> None:
        """Keep STATUS= true; the watch changes on every event and when the speaker starts or
        drains (repeats are skipped by the console)."""
        while True:
            self.console.status(status_text(self.state))
            await self.state.watch.next_change()

    async def _close(self) -> None:
        with trio.move_on_after(CLOSE_DEADLINE) as scope:
            scope.shield = True
            await self.transport.aclose()


def status_text(state: LinkState) -> str:
    """What the robot is doing, for ``systemctl status``."""
    conv, queued = state.conversation, state.buffer.queued_samples() > 0
    if conv.user_speaking:
        return "listening (you are speaking)"
    if conv.active_response and not queued:
        return "thinking"
    if queued or conv.active_response:
        return "speaking"
    return "listening"
