"""The one nursery: source → uplink → [service] → downlink → playback / recorder.

Channels and their policies (the only places that can fill up):

====================  ==========  ==========================================================
channel               bound       when full
====================  ==========  ==========================================================
source → uplink       50 frames   live capture: drop the newest frame and count it (capture
                      (1 s)       never blocks); file source: wait (a replay loses nothing)
downlink → playback   256 chunks  drop the chunk and count it (the downlink never waits on the
                                  speaker); the playout buffer behind it holds ≤ 60 s and
                                  drops its oldest audio beyond that
downlink → recorder   256 records wait, and log that it waited (transcripts are never dropped)
downlink → uplink     16 events   wait (control events are few and small)
====================  ==========  ==========================================================

Source, playback and recorder live for the whole run; the link supervisor opens one websocket
(one service session) after another: on connection loss it reconnects with exponential backoff
and jitter, before the service's session time limit it recycles the connection at a quiet
moment, and each new session gets the last turns re-sent as context.

End of stream flows by closing channels: the source closes its channel → the uplink waits for
the open turns to be answered and closes the websocket → the supervisor closes the playback and
recorder channels → playback drains, the recorder drains. ``Stopper.stop()`` (SIGTERM, Ctrl-C,
timeout) cancels the source and skips the waiting; a 2 s deadline backs it up, and the recorder
lives outside that deadline so nothing received is lost.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np
import trio

from r2d2voice.audio.pcm import rms_dbfs
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.link.transport import ConnectionClosed, Endpoint, open_realtime, send_event
from r2d2voice.realtime import protocol as p

log = logging.getLogger("r2d2voice.appliance.pipeline")

FRAMES_BOUND = 50  # 1 s of 20 ms frames
AUDIO_BOUND = 256
RECORDS_BOUND = 256
CONTROL_BOUND = 16
STOP_GRACE = 2.0
#: at most this many queued 20 ms frames are sent in one ``input_audio_buffer.append``
MAX_APPEND_FRAMES = 10


class Watch:
    """Lets tasks wait until the conversation reaches some state (trio-only, one loop)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


@dataclass
class Statistics:
    """Counters of one run; each session stores its share (see ``delta``)."""

    frames_sent: int = 0
    frames_dropped: int = 0
    frames_gated: int = 0
    audio_chunks_dropped: int = 0
    record_waits: int = 0
    junk_messages: int = 0
    service_errors: int = 0
    interruptions: int = 0
    reconnects: int = 0
    user_turns: int = 0
    assistant_turns: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def delta(self, since: dict[str, int]) -> dict[str, int]:
        return {k: v - since.get(k, 0) for k, v in self.snapshot().items()}


@dataclass(frozen=True)
class LinkPolicy:
    """How the link behaves over a long run."""

    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: a session that lived this long resets the backoff
    healthy_after: float = 20.0
    #: recycle the connection at a quiet moment after this long (the service stops at 60 min)
    session_max_seconds: float = 55 * 60
    #: turns re-sent as text items to a new session
    context_turns: int = 10
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    #: "half": mic audio is not sent while a reply plays and for ``echo_tail`` after it
    duplex: str = "half"
    echo_tail: float = 0.3
    #: in half duplex, mic audio this loud (dBFS RMS) for ``barge_in_ms`` opens the gate
    #: (barge-in); None: no barge-in while the robot speaks
    barge_in_dbfs: float | None = -25.0
    barge_in_ms: int = 120


class Source(Protocol):
    """Where microphone audio comes from: 960-byte frames of 24 kHz mono PCM16."""

    live: bool

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        """Send frames until the end of the input; owns ``send`` and closes it."""


class Sink(Protocol):
    """Where reply audio goes."""

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        """Play chunks until ``receive`` closes, then drain; owns ``receive``."""


class Console(Protocol):
    def transcript(self, role: str, text: str) -> None: ...
    def status(self, text: str) -> None: ...


class Sessions(Protocol):
    """The store's view of service sessions (the app implements it over SQLite)."""

    async def begin(self, previous: str | None) -> str: ...
    async def end(self, session_id: str, stats: dict[str, int]) -> None: ...
    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]: ...


class _Quiet:
    def transcript(self, role: str, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


@dataclass
class Context:
    """What the tasks of one run share: conversation state, playout buffer, counters."""

    conversation: p.Conversation
    buffer: PlayoutBuffer
    watch: Watch = field(default_factory=Watch)
    stats: Statistics = field(default_factory=Statistics)
    stopping: bool = False
    #: bumped for every new connection; a source can tell a turn was sent to a dead link
    epoch: int = 0
    connected: bool = False
    pending_user_items: set[str] = field(default_factory=set)
    #: trio time when reply audio was last queued for the speaker (half-duplex echo gate)
    last_playing: float = -1e9
    session_ids: list[str] = field(default_factory=list)


class Stopper:
    """Ends a run early and gracefully (signal or timeout)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._hooks: list[Callable[[], None]] = []

    def on_stop(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)
        if self.reason is not None:
            hook()

    def stop(self, reason: str = "stop") -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for hook in self._hooks:
            hook()


Recorder = Callable[[str, list[Any]], Awaitable[None]]


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


async def run_conversation(
    endpoint: Endpoint,
    session_config: p.SessionConfig,
    source: Source,
    sink: Sink,
    sessions: Sessions,
    record: Recorder,
    *,
    console: Console | None = None,
    stopper: Stopper | None = None,
    policy: LinkPolicy | None = None,
    settle_seconds: float = 1.0,
    on_configured: Callable[[], None] | None = None,
) -> Context:
    """Run a conversation from source to sink until the source ends and every turn is
    answered, or until ``stopper`` fires. ``record(session_id, batch)`` receives batches of
    protocol Store* actions (the recorder task calls it; it must not drop them).

    Raises ConfigError for a rejected key or a fatal service error, RuntimeFailure when the
    connection is lost and ``policy.reconnect`` is off — in every case after everything received
    has been recorded.
    """
    console = console or _Quiet()
    stopper = stopper or Stopper()
    policy = policy or LinkPolicy()
    ctx = Context(p.Conversation(), PlayoutBuffer())

    frames_send, frames_recv = trio.open_memory_channel[bytes](FRAMES_BOUND)
    audio_send, audio_recv = trio.open_memory_channel[AudioChunk](AUDIO_BOUND)
    records_send, records_recv = trio.open_memory_channel[Any](RECORDS_BOUND)

    async with trio.open_nursery() as outer:
        outer.start_soon(_recorder, records_recv, record)
        with trio.CancelScope() as inner_scope:
            source_scope = trio.CancelScope()

            def _on_stop() -> None:
                ctx.stopping = True
                source_scope.cancel()
                inner_scope.deadline = min(inner_scope.deadline,
                                           trio.current_time() + STOP_GRACE)
                ctx.watch.changed()

            async with trio.open_nursery() as inner:
                stopper.on_stop(_on_stop)

                async def source_task() -> None:
                    with source_scope:
                        await source.run(frames_send, ctx)
                    await trio.lowlevel.checkpoint()

                inner.start_soon(source_task)
                inner.start_soon(sink.run, audio_recv, ctx.buffer)
                link = _Supervisor(endpoint, session_config, source, sessions, ctx, policy,
                                   console, settle_seconds, on_configured)
                await link.run(frames_recv, audio_send, records_send)
                if link.failure is not None:
                    _on_stop()  # the source and the speaker need not go on
    if link.failure is not None:
        raise link.failure
    return ctx


async def _recorder(receive: trio.MemoryReceiveChannel[Any], record: Recorder) -> None:
    """The only writer of transcripts: batches whatever is already queued, commits at once."""
    async with receive:
        async for first in receive:
            batch = [first]
            while len(batch) < 64:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            with trio.CancelScope(shield=True):
                by_session: dict[str, list[Any]] = {}
                for session_id, action in batch:
                    by_session.setdefault(session_id, []).append(action)
                for session_id, actions in by_session.items():
                    await record(session_id, actions)


@dataclass
class _Connection:
    """How one connection ended."""

    session_id: str
    closing: bool = False  # we closed it: source done, or stopping
    recycle: bool = False  # we closed it to start a fresh session
    lost: str | None = None
    fatal: BaseException | None = None


class _Supervisor:
    """Owns the long-lived channel ends and runs one connection after another."""

    def __init__(self, endpoint: Endpoint, cfg: p.SessionConfig, source: Source,
                 sessions: Sessions,
                 ctx: Context, policy: LinkPolicy, console: Console, settle_seconds: float,
                 on_configured: Callable[[], None] | None) -> None:
        self.endpoint = endpoint
        self.cfg = cfg
        self.live = source.live
        self.source = source
        #: frames queued for a dead link are stale: live audio, or a source that resends turns
        self.drop_stale = source.live or bool(getattr(source, "resends", False))
        self.sessions = sessions
        self.ctx = ctx
        self.policy = policy
        self.console = console
        self.settle_seconds = settle_seconds
        self.on_configured = on_configured
        self.carry: bytes | None = None  # a frame taken but not sent when a link died
        self.source_done = False
        self.reconnecting = False  # the next session replaces a lost one
        #: why the run must end with an error, raised once everything is drained and stored
        self.failure: BaseException | None = None

    async def run(self, frames: trio.MemoryReceiveChannel[bytes],
                  audio: trio.MemorySendChannel[AudioChunk],
                  records: trio.MemorySendChannel[Any]) -> None:
        """Connections until done; closes the long-lived channels on the way out."""
        async with frames, audio, records:
            try:
                await self._loop(frames, audio, records)
            except (ConfigError, RuntimeFailure) as exc:
                self.failure = exc

    async def _loop(self, frames: trio.MemoryReceiveChannel[bytes],
                    audio: trio.MemorySendChannel[AudioChunk],
                    records: trio.MemorySendChannel[Any]) -> None:
        ctx, policy = self.ctx, self.policy
        attempt = 0
        previous: str | None = None
        while True:
            if ctx.stopping:
                return
            if attempt:
                delay = min(policy.backoff_max, policy.backoff_initial * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                self.console.status(f"reconnecting (attempt {attempt})")
                log.warning("reconnecting in %.1f s (attempt %d)", delay, attempt)
                with trio.move_on_after(delay):
                    await ctx.watch.wait_for(lambda: ctx.stopping)
                if ctx.stopping:
                    return
            try:
                started = trio.current_time()
                conn = await self._connect_and_run(frames, audio, records, previous)
            except RuntimeFailure as exc:  # could not connect: try again
                if not policy.reconnect:
                    raise
                log.warning("%s", exc)
                attempt += 1
                continue
            previous = conn.session_id
            if conn.fatal is not None:
                raise conn.fatal
            if conn.recycle:
                attempt = 0
                log.info("recycled the connection before the service's session limit")
                continue
            if conn.lost is None:
                return  # done or stopping
            if not policy.reconnect:
                raise RuntimeFailure(f"connection to the Realtime service lost ({conn.lost})")
            self.reconnecting = True
            healthy = trio.current_time() - started >= policy.healthy_after
            attempt = 1 if healthy else attempt + 1

    async def _connect_and_run(self, frames: trio.MemoryReceiveChannel[bytes],
                               audio: trio.MemorySendChannel[AudioChunk],
                               records: trio.MemorySendChannel[Any],
                               previous: str | None) -> _Connection:
        ctx = self.ctx
        async with open_realtime(self.endpoint) as ws:
            context: list[tuple[str, str]] = []
            if previous is not None and self.policy.context_turns > 0:
                context = await self.sessions.context(ctx.session_ids, self.policy.context_turns)
            session_id = await self.sessions.begin(previous)
            ctx.session_ids.append(session_id)
            conn = _Connection(session_id)
            ctx.conversation = p.Conversation()
            ctx.pending_user_items.clear()
            ctx.epoch += 1
            ctx.connected = True
            ctx.watch.changed()
            before = ctx.stats.snapshot()
            underruns_before = ctx.buffer.statistics().underruns
            capture_drops_before = getattr(self.source, "frames_dropped", 0)
            if self.reconnecting:  # counted in the session that replaces the lost one
                self.reconnecting = False
                ctx.stats.reconnects += 1
            if self.drop_stale:
                self._drop_stale(frames)
            try:
                async with trio.open_nursery() as nursery:
                    control_send, control_recv = trio.open_memory_channel[dict[str, Any]](
                        CONTROL_BOUND)
                    nursery.start_soon(self._uplink, ws, conn, context, frames, control_recv)
                    nursery.start_soon(self._downlink, ws, conn, audio, records, control_send,
                                       nursery.cancel_scope)
                    nursery.start_soon(self._keepalive, ws, conn)
                    nursery.start_soon(self._recycle_timer, ws, conn)
                    nursery.start_soon(self._status_loop)
            finally:
                ctx.connected = False
                ctx.watch.changed()
                stats = ctx.stats.delta(before)
                stats["underruns"] = ctx.buffer.statistics().underruns - underruns_before
                # frames the capture itself dropped because the uplink queue was full
                stats["frames_dropped"] += (getattr(self.source, "frames_dropped", 0)
                                            - capture_drops_before)
                with trio.CancelScope(shield=True):
                    await self.sessions.end(session_id, stats)
        return conn

    def _drop_stale(self, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        """Live audio captured while disconnected is dropped, not sent stale."""
        dropped = 1 if self.carry is not None else 0
        self.carry = None
        while True:
            try:
                frames.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            dropped += 1
        if dropped and self.live:
            self.ctx.stats.frames_dropped += dropped
            log.info("dropped %d stale microphone frames after reconnecting", dropped)

    # -- uplink -----------------------------------------------------------------------------
    async def _uplink(self, ws: Any, conn: _Connection, context: list[tuple[str, str]],
                      frames: trio.MemoryReceiveChannel[bytes],
                      control: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        """Session config, context, then frames → ``input_audio_buffer.append`` and control
        events; when the source ends, wait for open turns to be answered and close."""
        ctx = self.ctx
        gate = _EchoGate(self.policy) if self.live and self.policy.duplex == "half" else None
        try:
            await send_event(ws, p.session_update(self.cfg))
            for role, text in context:
                await send_event(ws, p.item_create_text(role, text))
        except ConnectionClosed:
            return
        if context:
            log.info("re-sent %d turns of context to the new session", len(context))
        closed = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_control, ws, control)
            try:
                if self.carry is not None:
                    await send_event(ws, p.input_audio_append(self.carry))
                    self.carry = None
                while not self.source_done:
                    try:
                        queued = [await frames.receive()]
                    except trio.EndOfChannel:
                        self.source_done = True
                        break
                    # frames already waiting (a fast replay, a link catching up) go out in one
                    # append; live frames arriving one by one are sent as they come
                    while len(queued) < MAX_APPEND_FRAMES:
                        try:
                            queued.append(frames.receive_nowait())
                        except trio.WouldBlock:
                            break
                        except trio.EndOfChannel:
                            self.source_done = True
                            break
                    out: list[bytes] = []
                    for frame in queued:
                        passed = gate.filter(frame, ctx) if gate is not None else [frame]
                        if not passed:
                            ctx.stats.frames_gated += 1
                        out += passed
                    if not out:
                        continue
                    chunk = b"".join(out)
                    try:
                        await send_event(ws, p.input_audio_append(chunk))
                    except ConnectionClosed:
                        if not self.drop_stale:  # a replay loses nothing: resend it
                            self.carry = chunk
                        elif self.live:
                            ctx.stats.frames_dropped += len(out)
                        raise
                    ctx.stats.frames_sent += len(out)
                if not ctx.stopping:
                    await _wait_settled(ctx, self.settle_seconds)
            except ConnectionClosed:
                closed = True
            nursery.cancel_scope.cancel()
        if not closed:
            conn.closing = True
            await _close(ws)

    # -- downlink ---------------------------------------------------------------------------
    async def _downlink(self, ws: Any, conn: _Connection,
                        audio: trio.MemorySendChannel[AudioChunk],
                        records: trio.MemorySendChannel[Any],
                        control: trio.MemorySendChannel[dict[str, Any]],
                        scope: trio.CancelScope) -> None:
        """Server events → conversation state → audio, records and control events."""
        ctx, console = self.ctx, self.console
        conv = ctx.conversation

        async def store(action: Any) -> None:
            try:
                records.send_nowait((conn.session_id, action))
            except trio.WouldBlock:
                ctx.stats.record_waits += 1
                log.warning("recorder is behind (%d records queued): waiting for it",
                            RECORDS_BOUND)
                await records.send((conn.session_id, action))

        async def route(actions: list[p.Action]) -> None:
            for a in actions:
                if isinstance(a, p.Play):
                    pcm = np.frombuffer(a.pcm, dtype="<i2")
                    ctx.last_playing = trio.current_time()
                    try:
                        audio.send_nowait(AudioChunk(a.item_id, pcm))
                    except trio.WouldBlock:
                        ctx.stats.audio_chunks_dropped += 1
                elif isinstance(a, p.BargeIn):
                    item = ctx.buffer.playing_item()
                    if item is not None:
                        ctx.buffer.cancel(item)
                        ctx.stats.interruptions += 1
                        played = ctx.buffer.played_samples(item)
                        log.info("barge-in: reply %s stopped after %.2f s", item,
                                 played / p.RATE)
                        if conv.received_samples(item):  # an item of this session
                            await route(conv.interrupted(item, played))
                elif isinstance(a, p.Send):
                    await control.send(a.event)
                else:
                    if isinstance(a, p.StoreMessage) and not a.partial:
                        if a.role == "user":
                            ctx.pending_user_items.discard(a.item_id)
                            ctx.stats.user_turns += 1
                        else:
                            ctx.stats.assistant_turns += 1
                        console.transcript(a.role, a.text)
                    elif isinstance(a, p.StoreError):
                        ctx.stats.service_errors += 1
                        log.warning("service error %s%s: %s", a.type,
                                    f" ({a.code})" if a.code else "", a.message)
                    await store(a)

        async with control:
            try:
                while True:
                    try:
                        message = await ws.get_message()
                    except ConnectionClosed as exc:
                        if not (ctx.stopping or conn.closing or conn.recycle or conn.lost):
                            reason = exc.reason
                            conn.lost = f"close code {reason.code}" if reason else "closed"
                        if conn.lost:
                            log.warning("connection to the Realtime service lost: %s", conn.lost)
                            await store(p.StoreError("connection_lost", None, conn.lost, False))
                        break
                    try:
                        event = p.parse_event(message)
                    except p.ProtocolError as exc:
                        ctx.stats.junk_messages += 1
                        log.debug("ignored: %s", exc)
                        continue
                    if isinstance(event, p.Ignored):
                        log.debug("ignored event %s", event.type)
                        continue
                    if isinstance(event, p.InputCommitted):
                        ctx.pending_user_items.add(event.item_id)
                    elif isinstance(event, p.UserTranscriptFailed):
                        ctx.pending_user_items.discard(event.item_id)
                    await route(conv.receive(event, time.time()))
                    await route(_played_latencies(ctx, conv))
                    console.status(_status(ctx))
                    if isinstance(event, p.SessionUpdated) and self.on_configured:
                        self.on_configured()
                    if isinstance(event, p.ServiceError):
                        if event.fatal:
                            conn.fatal = ConfigError(
                                f"the Realtime service refused: {event.message}"
                                + (f" ({event.code})" if event.code else ""))
                            break
                        if event.ends_session:
                            conn.lost = f"session ended by the service ({event.code})"
                    ctx.watch.changed()
            finally:
                with trio.CancelScope(shield=True):
                    for a in [*_played_latencies(ctx, conv), *conv.flush(time.time())]:
                        await store(a)
                ctx.watch.changed()
        # this connection is over: stop its uplink, keepalive and timer too
        scope.cancel()
        await _close(ws)

    # -- keepalive and recycling ------------------------------------------------------------
    async def _keepalive(self, ws: Any, conn: _Connection) -> None:
        """A ping the service does not answer in time means the link is dead."""
        while True:
            await trio.sleep(self.policy.ping_interval)
            with trio.move_on_after(self.policy.ping_timeout) as waited:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
            if waited.cancelled_caught:
                conn.lost = "ping timeout"
                await _close(ws)
                return

    async def _status_loop(self) -> None:
        """The speaker drains without server events: keep STATUS= true (repeats are skipped)."""
        while True:
            await trio.sleep(0.1)
            self.console.status(_status(self.ctx))

    async def _recycle_timer(self, ws: Any, conn: _Connection) -> None:
        """Before the service's session limit, start a fresh session at a quiet moment."""
        ctx = self.ctx
        await trio.sleep(self.policy.session_max_seconds)
        log.info("session limit near: recycling the connection at the next quiet moment")

        def quiet() -> bool:
            return (ctx.conversation.idle and not ctx.pending_user_items
                    and ctx.buffer.queued_samples() == 0)

        # the playout buffer drains without events: look every 100 ms
        quiet_since: float | None = None
        while True:
            await trio.sleep(0.1)
            now = trio.current_time()
            if not quiet():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= 0.5:
                break
        conn.recycle = True
        await _close(ws)


class _EchoGate:
    """Half duplex: while a reply plays (and ``echo_tail`` after), mic frames are held back so
    the speaker can't trigger the service's VAD. Speech clearly louder than the playback leak
    (``barge_in_dbfs`` for ``barge_in_ms``) opens the gate, sending the held frames first."""

    def __init__(self, policy: LinkPolicy) -> None:
        self.policy = policy
        self.need = max(1, policy.barge_in_ms // 20)
        self.held: deque[bytes] = deque(maxlen=max(self.need, 15))
        self.loud = 0
        self.open_until_quiet = False

    def filter(self, frame: bytes, ctx: Context) -> list[bytes]:
        now = trio.current_time()
        queued = ctx.buffer.queued_samples() > 0
        if queued:
            ctx.last_playing = now
        playing = queued or now - ctx.last_playing < self.policy.echo_tail
        if not playing:
            self.open_until_quiet = False
            self.held.clear()
            self.loud = 0
            return [frame]
        if self.open_until_quiet:
            return [frame]
        if self.policy.barge_in_dbfs is None:
            return []
        self.held.append(frame)
        level = rms_dbfs(np.frombuffer(frame, dtype="<i2"))
        self.loud = self.loud + 1 if level >= self.policy.barge_in_dbfs else 0
        if self.loud >= self.need:
            log.info("barge-in: speech over the robot (%.0f dBFS); opening the mic", level)
            self.open_until_quiet = True
            out = list(self.held)
            self.held.clear()
            return out
        return []


async def _close(ws: Any) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        await ws.aclose()


async def _forward_control(ws: Any, control: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
    async with control:
        try:
            async for event in control:
                await send_event(ws, event)
        except ConnectionClosed:
            return


async def _wait_settled(ctx: Context, settle_seconds: float) -> None:
    """Until no turn is open: no speech, no reply in progress, user transcripts in, for
    ``settle_seconds`` in a row (the service may still be deciding about the tail)."""

    def settled() -> bool:
        return ctx.stopping or (ctx.conversation.idle and not ctx.pending_user_items)

    while not ctx.stopping:
        await ctx.watch.wait_for(settled)
        with trio.move_on_after(settle_seconds) as quiet:
            await ctx.watch.wait_for(lambda: not settled())
        if quiet.cancelled_caught:
            return


def _played_latencies(ctx: Context, conv: p.Conversation) -> list[p.Action]:
    """Latency records for replies whose first sample the speaker has taken by now."""
    out: list[p.Action] = []
    for item_id in list(conv.awaiting_play):
        at = ctx.buffer.first_played_at(item_id)
        if at is not None:
            out += conv.first_played(item_id, at)
    return out


def _status(ctx: Context) -> str:
    """What the robot is doing, for ``systemctl status``."""
    conv = ctx.conversation
    if conv.user_speaking:
        return "listening (you are speaking)"
    if conv.active_response and not ctx.buffer.queued_samples():
        return "thinking"
    if ctx.buffer.queued_samples() or conv.active_response:
        return "speaking"
    return "listening"


def record_calls(action: Any) -> list[tuple[str, dict[str, Any]]]:
    """The store method calls (name, keyword arguments) that persist one Store* action."""
    if isinstance(action, p.StoreMessage):
        return [("upsert_message", {
            "role": action.role, "item_id": action.item_id, "text": action.text,
            "response_id": action.response_id, "raw_event": action.raw,
            "created_at": _utc(action.created_at),
        })]
    if isinstance(action, p.StoreInterrupted):
        return [("mark_interrupted", {"item_id": action.item_id, "played_ms": action.played_ms})]
    if isinstance(action, p.StoreResponse):
        calls: list[tuple[str, dict[str, Any]]] = [("record_response", {
            "response_id": action.response_id, "status": action.status, "usage": action.usage,
            "created_at": _utc(action.created_at) if action.created_at else None,
            "done_at": _utc(action.done_at),
        })]
        if action.first_audio_ms is not None:
            calls.append(("set_response_latency", {
                "response_id": action.response_id,
                "first_audio_ms": round(action.first_audio_ms)}))
        return calls
    if isinstance(action, p.StoreLatency):
        return [("set_response_latency", {"response_id": action.response_id,
                                          "first_played_ms": round(action.first_played_ms)})]
    if isinstance(action, p.StoreError):
        return [("record_error", {"source": "service", "type": action.type, "code": action.code,
                                  "message": action.message})]
    if isinstance(action, p.StoreSession):
        return [("set_service_session_id", {"service_session_id": action.service_session_id})]
    raise TypeError(f"not a record: {action!r}")
