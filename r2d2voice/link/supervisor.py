"""One connection after another: reconnect with backoff, recycle before the session limit,
carry the last turns as context into each new session; run the model's tool calls.

The session gate (``link/state.py`` :class:`SessionGate`) says when a conversation may start
and when it is over; within one, after a lost link the next session comes after a backoff
delay, after the service's ``session_expired`` or our recycling at once, with the last turns as
context. A new conversation carries no context.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.link.connection import Connection, FrameFeed, ToolPorts
from r2d2voice.link.parts import Connected, LinkParts
from r2d2voice.link.state import LinkPolicy, LinkState, Opening
from r2d2voice.link.tools import (
    CALLS_BOUND,
    RESULTS_BOUND,
    ToolDone,
    ToolJob,
    ToolNews,
    ToolRunner,
    no_tools,
)
from r2d2voice.protocol.actions import Record
from r2d2voice.protocol.core import End, EndReason

log = logging.getLogger("r2d2voice.link.supervisor")

#: deadline of the shielded write that closes a session row on the way out
END_DEADLINE = 3.0


class Backoff:
    """Delays before reconnecting: ``initial * 2**(n-1)`` after the n-th failure in a row,
    capped at ``maximum``, times a jitter factor in [0.5, 1) from ``rng``. A session that lived
    ``healthy_after`` seconds counts as a fresh start (its loss is failure 1)."""

    def __init__(self, policy: LinkPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def failed(self, lived: float | None = None) -> None:
        """A connection failed (``lived`` seconds after it opened; None: it never opened)."""
        healthy = lived is not None and lived >= self.policy.healthy_after
        self.failures = 1 if healthy else self.failures + 1

    def delay(self) -> float:
        if not self.failures:
            return 0.0
        base = self.policy.backoff_initial * 2 ** (self.failures - 1)
        return min(self.policy.backoff_max, base) * self.rng.uniform(0.5, 1.0)


class Supervisor:
    """Owns the long-lived channel ends and runs one connection after another, when and for as
    long as the session gate wants a session."""

    def __init__(self, parts: LinkParts, state: LinkState) -> None:
        self.parts = parts
        self.state = state
        self.policy = parts.policy
        self.console = parts.console
        self.gate = parts.gate
        self.backoff = Backoff(parts.policy, parts.rng or random.Random())
        self.tools = parts.tools or no_tools
        self.reconnecting = False  # the next session replaces a lost one
        #: how the conversation's last connection ended, when the next one replaces it
        self.replacing: End | None = None
        #: where this conversation's sessions start in ``state.session_ids`` (a new
        #: conversation carries no context from before it)
        self.chain_start = 0
        #: the connection in progress (the gate may end it)
        self._current: Connection | None = None
        #: when a run that never connected gives up (see ``_never_connected``)
        self._giving_up_at: float | None = None
        #: the counters when the last session ended (its row has them)
        self._counted: dict[str, int] = {}
        #: why the run must end with an error, raised once everything is drained and stored
        self.failure: ConfigError | RuntimeFailure | None = None
        #: how the conversation in progress ended: the gate closed it (its reason), and how
        #: its last connection ended
        self._closed: str | None = None
        self._end: EndReason | None = None

    async def run(self, frames: trio.MemoryReceiveChannel[bytes],
                  audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
        """Conversations until done; closes the long-lived channels on the way out. Tools still
        running when the last conversation is over are stopped (and recorded as stopped)."""
        async with frames, audio, records:
            source = self.parts.source
            feed = FrameFeed(frames, drop_stale=source.live or source.resends, live=source.live)
            calls_send, calls_recv = trio.open_memory_channel[ToolJob](CALLS_BOUND)
            results_send, results_recv = trio.open_memory_channel[ToolNews](RESULTS_BOUND)
            async with results_recv:
                async with trio.open_nursery() as nursery:
                    runner = ToolRunner(self.tools, records, self.parts.offer,
                                        self.parts.on_record, self.state.moments)
                    nursery.start_soon(runner.run, calls_recv, results_send)
                    async with calls_send:
                        try:
                            await self._conversations(feed, audio, records,
                                                      ToolPorts(calls_send, results_recv))
                        except (ConfigError, RuntimeFailure) as exc:
                            self.failure = exc
                    nursery.cancel_scope.cancel()  # tools still running are stopped
                await _store_undelivered(results_recv, records, self.parts.on_record)

    async def _conversations(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                             records: trio.MemorySendChannel[tuple[str, Record]],
                             tools: ToolPorts) -> None:
        previous: str | None = None
        while not self.state.stopping and not feed.done:
            opening = await self.gate.wait_open()
            if opening is None or self.state.stopping:
                return
            moments = self.state.moments
            if opening.new_conversation:
                previous = None
                self.chain_start = len(self.state.session_ids)
                self.backoff.reset()
                self.replacing = None
                moments.conversation_started()
            ports = _Ports(feed, audio, records, tools, opening)
            first = len(self.state.session_ids)
            failure: ConfigError | RuntimeFailure | None = None
            self._closed = self._end = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_gate_says, nursery.cancel_scope)
                try:
                    previous = await self._conversation(ports, previous)
                except (ConfigError, RuntimeFailure) as exc:  # raised as it is, not in a group
                    failure = exc
                nursery.cancel_scope.cancel()
            moments.conversation_ended(
                ended_as(self._closed, self._end, failed=failure is not None))
            await self.gate.over(self.state.session_ids[first:])
            if failure is not None:
                raise failure

    async def _close_when_gate_says(self, scope: trio.CancelScope) -> None:
        reason = await self.gate.wait_close()
        self._closed = reason
        log.info("conversation over (%s): closing", reason)
        if self._current is not None:
            await self._current.finish(EndReason(End.DONE, reason))
        else:  # still connecting (or backing off): give up on it
            scope.cancel()

    async def _conversation(self, ports: _Ports, previous: str | None) -> str | None:
        """Connections until the conversation is over; the last session's id."""
        state, policy = self.state, self.policy
        while not state.stopping:
            delay = self.backoff.delay()
            if self._giving_up_at is not None:  # never wait past the point of giving up
                delay = max(0.0, min(delay, self._giving_up_at - trio.current_time()))
            if delay:
                self.console.status(f"reconnecting (attempt {self.backoff.failures})")
                log.warning("reconnecting in %.1f s (attempt %d)", delay, self.backoff.failures)
                with trio.move_on_after(delay):
                    await state.watch.wait_for(lambda: state.stopping)
                if state.stopping:
                    return previous
            started = trio.current_time()
            limit = policy.give_up_connecting
            if limit is not None and self._giving_up_at is None and not state.session_ids:
                self._giving_up_at = started + limit
            try:
                end, previous = await self._connection(ports, previous)
                self._end = end
            except RuntimeFailure as exc:  # could not connect: try again
                if not policy.reconnect:
                    raise
                self._never_connected(exc)
                log.warning("%s", exc)
                self.backoff.failed()
                continue
            if end.kind is End.FATAL:
                raise ConfigError(end.detail)
            goes_on = self.gate.ended(end) and end.kind is not End.DONE
            if end.kind is End.LOST and goes_on:
                if not policy.reconnect:
                    raise RuntimeFailure(
                        f"connection to the service lost ({end.detail})")
                self.reconnecting = True
                self.backoff.failed(lived=trio.current_time() - started)
            elif end.kind is End.RECYCLE:
                self.backoff.reset()
                log.info("recycled the connection before the service's session limit")
            elif end.kind is End.EXPIRED:  # the service's limit: a new session at once
                self.backoff.reset()
                self.reconnecting = True
            if not goes_on:
                return previous
            self.replacing = end.kind
        return previous

    async def _connection(self, ports: _Ports, previous: str | None
                          ) -> tuple[EndReason, str]:
        state, feed = self.state, ports.feed
        async with self.parts.connect(self.parts.endpoint) as transport:
            context: list[tuple[str, str]] = []
            if previous is not None and self.policy.context_turns > 0:
                context = await self.parts.sessions.context(
                    state.session_ids[self.chain_start:], self.policy.context_turns)
            session_id = await self.parts.sessions.begin(previous, ports.opening.metadata)
            state.session_ids.append(session_id)
            state.moments.session(session_id)
            state.conversation = core = await self.parts.new_core(context)
            state.epoch += 1
            state.connected = True
            state.watch.changed()
            self.parts.on_connection(Connected(session_id, self.replacing))
            self.replacing = None
            # what happened since the last session ended (between sessions too) is this one's
            before = self._counted
            if self.reconnecting:  # counted in the session that replaces the lost one
                self.reconnecting = False
                state.stats.reconnects += 1
            preroll = self.gate.take_preroll()
            if preroll is not None:
                feed.drop_queued()  # older than the pre-roll: from before the wake or onset
            elif feed.drop_stale:
                dropped = feed.drop_queued()
                if dropped and feed.live:
                    state.stats.frames_dropped += dropped
                    log.info("dropped %d stale microphone frames after reconnecting", dropped)
            feed.preroll = preroll or []
            connection = self._current = Connection(transport, state, self.parts, session_id,
                                                    tools=ports.tools)
            try:
                end = await connection.run(feed, ports.audio, ports.records)
            finally:
                self._current = None
                state.connected = False
                state.watch.changed()
                self.parts.on_connection(core.end or EndReason(End.DONE, "stopping"))
                for key, value in core.statistics().items():  # the session's own counts
                    setattr(state.stats, key, getattr(state.stats, key) + value)
                self._counted = self._counters()
                stats = _delta(self._counted, before)
                with trio.move_on_after(END_DEADLINE) as scope:
                    scope.shield = True
                    await self.parts.sessions.end(session_id, stats)
                if scope.cancelled_caught:
                    log.error("could not close session %s within %.0f s", session_id,
                              END_DEADLINE)
        return end, session_id

    def _never_connected(self, exc: RuntimeFailure) -> None:
        """A run that has never reached the service gives up after
        ``policy.give_up_connecting`` seconds of trying (None: it never gives up)."""
        limit = self.policy.give_up_connecting
        if limit is None or self.state.session_ids:
            return
        if self._giving_up_at is not None and trio.current_time() >= self._giving_up_at:
            raise RuntimeFailure(f"could not connect to {self.parts.endpoint.display} in "
                                 f"{limit:g} s of trying; nothing was sent ({exc})")

    def _counters(self) -> dict[str, int]:
        """The link's counters and those of the run's other parts, as they are now."""
        counters = self.state.stats.snapshot()
        for key, value in self.parts.counters().items():
            counters[key] = counters.get(key, 0) + value
        return counters


@dataclass(frozen=True)
class _Ports:
    """What one conversation's connections use (the feed and channels span the run)."""

    feed: FrameFeed
    audio: trio.MemorySendChannel[AudioChunk]
    records: trio.MemorySendChannel[tuple[str, Record]]
    tools: ToolPorts
    opening: Opening


def ended_as(closed: str | None, end: EndReason | None, *, failed: bool = False) -> str:
    """How a conversation ended, in a word or two (``conversation_ended {reason}``): what the
    session gate said when it closed it (``idle``, ``no service``, ``listening off``), else
    how its last connection ended (``end of input``, ``stopped``, ``hangup``, ``lost``,
    ``fatal``)."""
    if closed is not None:
        return closed
    if end is None:
        return "failed" if failed else "stopped"
    if end.kind is End.DONE:
        return "end of input" if end.detail == "input ended" else "stopped"
    return end.kind.value


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """A session's share of counters that span the run (the session row's statistics)."""
    return {key: value - before.get(key, 0) for key, value in now.items()}


async def _store_undelivered(results: trio.MemoryReceiveChannel[ToolNews],
                             records: trio.MemorySendChannel[tuple[str, Record]],
                             observe: Callable[[Record], None]) -> None:
    """Results that finished after the last connection: recorded, not delivered (prompts and
    offers mean nothing without a session)."""
    while True:
        try:
            done = results.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        if not isinstance(done, ToolDone):
            continue
        log.warning("tool %s (call %s) finished after the conversation ended: output not "
                    "delivered", done.job.call.name, done.job.call.call_id)
        observe(done.result)
        with trio.move_on_after(END_DEADLINE) as scope:
            scope.shield = True
            await records.send((done.job.session_id, done.result))
