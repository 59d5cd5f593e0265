"""One connection after another: reconnect with backoff, recycle before the session limit,
carry the last turns as context into each new session; run the model's tool calls.

After a lost link the next session comes after a backoff delay; after the service's
``session_expired`` or our recycling, at once. After the robot hung up (``end_conversation``)
the next session is a new conversation (no context carried): for a live microphone it starts
when the local VAD hears speech again (no connection while nobody talks); for a file, at once
(the file is a user who keeps talking).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.link.connection import Connection, Ending, FrameFeed, ToolPorts
from r2d2voice.link.dormant import wait_for_speech
from r2d2voice.link.state import Console, FrameSource, LinkPolicy, LinkState, Sessions
from r2d2voice.link.tools import (
    CALLS_BOUND,
    RESULTS_BOUND,
    ToolCaller,
    ToolDone,
    ToolJob,
    ToolOffer,
    ToolPrompt,
    ToolRunner,
    no_tools,
)
from r2d2voice.link.transport import Connector, Endpoint
from r2d2voice.protocol.actions import Record
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
                 rng: random.Random | None = None, tools: ToolCaller | None = None,
                 offer: ToolOffer | None = None) -> None:
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
        self.tools = tools or no_tools
        self.offer = offer
        self.reconnecting = False  # the next session replaces a lost one
        #: where this conversation's sessions start in ``state.session_ids`` (a hang-up
        #: starts a new conversation: no context from before it)
        self.chain_start = 0
        #: capture drops already counted in a session (those between sessions go to the next)
        self.capture_drops_counted = 0
        #: why the run must end with an error, raised once everything is drained and stored
        self.failure: ConfigError | RuntimeFailure | None = None

    async def run(self, frames: trio.MemoryReceiveChannel[bytes],
                  audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
        """Connections until done; closes the long-lived channels on the way out. Tools still
        running when the conversation is over are stopped (and recorded as stopped)."""
        async with frames, audio, records:
            feed = FrameFeed(frames, drop_stale=self.source.live or self.source.resends,
                             live=self.source.live)
            calls_send, calls_recv = trio.open_memory_channel[ToolJob](CALLS_BOUND)
            results_send, results_recv = trio.open_memory_channel[ToolDone | ToolPrompt](
                RESULTS_BOUND)
            async with results_recv:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ToolRunner(self.tools, records).run, calls_recv,
                                       results_send)
                    async with calls_send:
                        try:
                            await self._loop(feed, audio, records,
                                             ToolPorts(calls_send, results_recv, self.offer))
                        except (ConfigError, RuntimeFailure) as exc:
                            self.failure = exc
                    nursery.cancel_scope.cancel()  # tools still running are stopped
                await _store_undelivered(results_recv, records)

    async def _loop(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                    records: trio.MemorySendChannel[tuple[str, Record]],
                    tools: ToolPorts) -> None:
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
                ending = await self._connection(feed, audio, records, previous, tools)
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
            if ending.hangup:
                self.backoff.reset()
                previous = None  # a new conversation: nothing carried over
                self.chain_start = len(self.state.session_ids)
                if self.source.live and not await self._dormant(feed):
                    return
                continue
            if ending.expired:  # the service's time limit: a new session at once, no failure
                self.backoff.reset()
                self.reconnecting = True
                continue
            if ending.lost is None:
                return  # done or stopping
            if not policy.reconnect:
                raise RuntimeFailure(f"connection to the Realtime service lost ({ending.lost})")
            self.reconnecting = True
            self.backoff.failed(lived=trio.current_time() - started)

    async def _dormant(self, feed: FrameFeed) -> bool:
        """No session until someone speaks; False if the run ends first."""
        self.console.status("conversation ended; listening for speech")
        log.info("no session until someone speaks")
        cfg = self.config
        return await wait_for_speech(feed, threshold=cfg.vad_threshold,
                                     prefix_ms=cfg.vad_prefix_ms, silence_ms=cfg.vad_silence_ms)

    async def _connection(self, feed: FrameFeed, audio: trio.MemorySendChannel[AudioChunk],
                          records: trio.MemorySendChannel[tuple[str, Record]],
                          previous: str | None, tools: ToolPorts) -> Ending:
        state = self.state
        async with self.connect(self.endpoint) as transport:
            context: list[tuple[str, str]] = []
            if previous is not None and self.policy.context_turns > 0:
                context = await self.sessions.context(state.session_ids[self.chain_start:],
                                                      self.policy.context_turns)
            session_id = await self.sessions.begin(previous)
            state.session_ids.append(session_id)
            state.conversation = Conversation(interrupt_response=self.config.interrupt_response)
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
            if feed.drop_stale and not feed.preroll:  # after a wake-up, queued speech is fresh
                dropped = feed.drop_queued()
                if dropped and feed.live:
                    state.stats.frames_dropped += dropped
                    log.info("dropped %d stale microphone frames after reconnecting", dropped)
            connection = Connection(transport, state, self.policy, Ending(session_id),
                                    self.console, config=self.config, context=context,
                                    settle_seconds=self.settle_seconds,
                                    on_configured=self.on_configured, tools=tools)
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


async def _store_undelivered(results: trio.MemoryReceiveChannel[ToolDone | ToolPrompt],
                             records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
    """Results that finished after the last connection: recorded, not delivered."""
    while True:
        try:
            done = results.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        if isinstance(done, ToolPrompt):
            continue
        log.warning("tool %s (call %s) finished after the conversation ended: output not "
                    "delivered", done.job.call.name, done.job.call.call_id)
        with trio.move_on_after(END_DEADLINE) as scope:
            scope.shield = True
            await records.send((done.job.session_id, done.result))
