"""One connection after another: reconnect with backoff, recycle before the session limit,
carry the last turns as context into each new session."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.link.connection import Connection, Ending, FrameFeed
from r2d2voice.link.state import Console, FrameSource, LinkPolicy, LinkState, Sessions
from r2d2voice.link.transport import Connector, Endpoint
from r2d2voice.realtime.actions import Record
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.realtime.conversation import Conversation

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
    """Owns the long-lived channel ends and runs one connection after another."""

    def __init__(self, endpoint: Endpoint, connect: Connector, config: SessionConfig,
                 source: FrameSource, sessions: Sessions, state: LinkState,
                 policy: LinkPolicy, console: Console, *, settle_seconds: float = 1.0,
                 on_configured: Callable[[], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.endpoint = endpoint
        self.connect = connect
        self.config = config
        self.source = source
        self.sessions = sessions
        self.state = state
        self.policy = policy
        self.console = console
        self.settle_seconds = settle_seconds
        self.on_configured = on_configured
        self.backoff = Backoff(policy, rng or random.Random())
        self.reconnecting = False  # the next session replaces a lost one
        #: capture drops already counted in a session (those between sessions go to the next)
        self.capture_drops_counted = 0
        #: why the run must end with an error, raised once everything is drained and stored
        self.failure: ConfigError | RuntimeFailure | None = None

    async def run(self, frames: trio.MemoryReceiveChannel[bytes],
                  audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
        """Connections until done; closes the long-lived channels on the way out."""
        async with frames, audio, records:
            feed = FrameFeed(frames, drop_stale=self.source.live or self.source.resends,
                             live=self.source.live)
            try:
                await self._loop(feed, audio, records)
            except (ConfigError, RuntimeFailure) as exc:
                self.failure = exc

    async def _loop(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                    records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
        state, policy = self.state, self.policy
        previous: str | None = None
        while not state.stopping:
            delay = self.backoff.delay()
            if delay:
                self.console.status(f"reconnecting (attempt {self.backoff.failures})")
                log.warning("reconnecting in %.1f s (attempt %d)", delay, self.backoff.failures)
                with trio.move_on_after(delay):
                    await state.watch.wait_for(lambda: state.stopping)
                if state.stopping:
                    return
            started = trio.current_time()
            try:
                ending = await self._connection(feed, audio, records, previous)
            except RuntimeFailure as exc:  # could not connect: try again
                if not policy.reconnect:
                    raise
                log.warning("%s", exc)
                self.backoff.failed()
                continue
            previous = ending.session_id
            if ending.fatal is not None:
                raise ending.fatal
            if ending.recycle:
                self.backoff.reset()
                log.info("recycled the connection before the service's session limit")
                continue
            if ending.lost is None:
                return  # done or stopping
            if not policy.reconnect:
                raise RuntimeFailure(f"connection to the Realtime service lost ({ending.lost})")
            self.reconnecting = True
            self.backoff.failed(lived=trio.current_time() - started)

    async def _connection(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                          records: trio.MemorySendChannel[tuple[str, Record]],
                          previous: str | None) -> Ending:
        state = self.state
        async with self.connect(self.endpoint) as transport:
            context: list[tuple[str, str]] = []
            if previous is not None and self.policy.context_turns > 0:
                context = await self.sessions.context(state.session_ids,
                                                      self.policy.context_turns)
            session_id = await self.sessions.begin(previous)
            state.session_ids.append(session_id)
            state.conversation = Conversation()
            state.epoch += 1
            state.connected = True
            if state.gate is not None:
                state.gate.reset()
            state.watch.changed()
            before = state.stats.snapshot()
            underruns_before = state.buffer.statistics().underruns
            if self.reconnecting:  # counted in the session that replaces the lost one
                self.reconnecting = False
                state.stats.reconnects += 1
            if feed.drop_stale:
                dropped = feed.drop_queued()
                if dropped and feed.live:
                    state.stats.frames_dropped += dropped
                    log.info("dropped %d stale microphone frames after reconnecting", dropped)
            connection = Connection(transport, state, self.policy, Ending(session_id),
                                    self.console, config=self.config, context=context,
                                    settle_seconds=self.settle_seconds,
                                    on_configured=self.on_configured)
            try:
                return await connection.run(feed, audio, records)
            finally:
                state.connected = False
                state.watch.changed()
                stats = state.stats.delta(before)
                stats["underruns"] = state.buffer.statistics().underruns - underruns_before
                # frames the capture itself dropped because the uplink queue was full
                capture_drops = self.source.frames_dropped
                stats["frames_dropped"] += capture_drops - self.capture_drops_counted
                self.capture_drops_counted = capture_drops
                with trio.move_on_after(END_DEADLINE) as scope:
                    scope.shield = True
                    await self.sessions.end(session_id, stats)
                if scope.cancelled_caught:
                    log.error("could not close session %s within %.0f s", session_id,
                              END_DEADLINE)
