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

End of stream flows by closing channels: the source closes its channel → the uplink waits for
the open turns to be answered and closes the websocket → the downlink stores what it has and
closes its channels → playback drains, the recorder drains. ``Stopper.stop()`` (SIGTERM, Ctrl-C,
timeout) cancels the source and skips the waiting; a 2 s deadline backs it up, and the recorder
lives outside that deadline so nothing received is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np
import trio

from . import protocol as p
from .errors import ConfigError, RuntimeFailure
from .link import ConnectionClosed, Endpoint, open_realtime, send_event
from .playout import AudioChunk, PlayoutBuffer

log = logging.getLogger("r2d2voice.pipeline")

FRAMES_BOUND = 50  # 1 s of 20 ms frames
AUDIO_BOUND = 256
RECORDS_BOUND = 256
CONTROL_BOUND = 16
STOP_GRACE = 2.0


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
    """Counters a person (or ``stats``) reads after a run."""

    frames_sent: int = 0
    frames_dropped: int = 0
    audio_chunks_dropped: int = 0
    record_waits: int = 0
    junk_messages: int = 0
    service_errors: int = 0
    interruptions: int = 0
    reply_samples: int = 0
    user_turns: int = 0
    assistant_turns: int = 0


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
    #: set by the uplink just before it closes the socket itself
    closing: bool = False
    pending_user_items: set[str] = field(default_factory=set)


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


Recorder = Callable[[list[Any]], Awaitable[None]]


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


async def run_conversation(
    endpoint: Endpoint,
    session_config: p.SessionConfig,
    source: Source,
    sink: Sink,
    record: Recorder,
    *,
    console: Console | None = None,
    stopper: Stopper | None = None,
    settle_seconds: float = 1.0,
    on_configured: Callable[[], None] | None = None,
) -> Context:
    """Run one Realtime session from source to sink until the source ends and every turn is
    answered, or until ``stopper`` fires. ``record`` receives batches of protocol Store* actions
    (the recorder task calls it; it must not drop them).

    Raises ConfigError for a rejected key or a fatal service error, RuntimeFailure when the
    connection is lost, in both cases after everything received has been recorded.
    """
    console = console or _Quiet()
    stopper = stopper or Stopper()
    ctx = Context(p.Conversation(), PlayoutBuffer())
    fatal: list[BaseException] = []

    frames_send, frames_recv = trio.open_memory_channel[bytes](FRAMES_BOUND)
    audio_send, audio_recv = trio.open_memory_channel[AudioChunk](AUDIO_BOUND)
    records_send, records_recv = trio.open_memory_channel[Any](RECORDS_BOUND)
    control_send, control_recv = trio.open_memory_channel[dict[str, Any]](CONTROL_BOUND)

    async with open_realtime(endpoint) as ws, trio.open_nursery() as outer:
        outer.start_soon(_recorder, records_recv, record)
        with trio.CancelScope() as inner_scope:

            def _on_stop() -> None:
                ctx.stopping = True
                source_scope.cancel()
                inner_scope.deadline = min(inner_scope.deadline,
                                           trio.current_time() + STOP_GRACE)
                ctx.watch.changed()

            source_scope = trio.CancelScope()
            async with trio.open_nursery() as inner:
                stopper.on_stop(_on_stop)

                async def source_task() -> None:
                    with source_scope:
                        await source.run(frames_send, ctx)
                    await trio.lowlevel.checkpoint()

                inner.start_soon(source_task)
                inner.start_soon(_uplink, ws, session_config, frames_recv, control_recv, ctx,
                                 settle_seconds)
                inner.start_soon(_downlink, ws, ctx, audio_send, records_send, control_send,
                                 console, fatal, on_configured)
                inner.start_soon(sink.run, audio_recv, ctx.buffer)
    if fatal:
        raise fatal[0]
    return ctx


async def _recorder(receive: trio.MemoryReceiveChannel[Any], record: Recorder) -> None:
    """The only writer of the database: batches whatever is already queued, commits at once."""
    async with receive:
        async for first in receive:
            batch = [first]
            while len(batch) < 64:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            with trio.CancelScope(shield=True):
                await record(batch)


async def _uplink(
    ws: Any,
    cfg: p.SessionConfig,
    frames: trio.MemoryReceiveChannel[bytes],
    control: trio.MemoryReceiveChannel[dict[str, Any]],
    ctx: Context,
    settle_seconds: float,
) -> None:
    """Frames → ``input_audio_buffer.append``; control events as the downlink asks.
    When the source ends, wait for the open turns to be answered, then close the socket."""
    try:
        await send_event(ws, p.session_update(cfg))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_control, ws, control)
            async with frames:
                async for frame in frames:
                    await send_event(ws, p.input_audio_append(frame))
                    ctx.stats.frames_sent += 1
            if not ctx.stopping:
                await _wait_settled(ctx, settle_seconds)
            nursery.cancel_scope.cancel()
    except ConnectionClosed:
        return
    ctx.closing = True
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        await ws.aclose()


async def _forward_control(ws: Any, control: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
    async with control:
        async for event in control:
            await send_event(ws, event)


async def _wait_settled(ctx: Context, settle_seconds: float) -> None:
    """Until no turn is open: no speech, no reply in progress, user transcripts in, for
    ``settle_seconds`` in a row (the service may still be deciding about the tail)."""
    conv = ctx.conversation

    def settled() -> bool:
        return ctx.stopping or (conv.idle and not ctx.pending_user_items)

    while not ctx.stopping:
        await ctx.watch.wait_for(settled)
        with trio.move_on_after(settle_seconds) as quiet:
            await ctx.watch.wait_for(lambda: not settled())
        if quiet.cancelled_caught:
            return


async def _downlink(
    ws: Any,
    ctx: Context,
    audio: trio.MemorySendChannel[AudioChunk],
    records: trio.MemorySendChannel[Any],
    control: trio.MemorySendChannel[dict[str, Any]],
    console: Console,
    fatal: list[BaseException],
    on_configured: Callable[[], None] | None,
) -> None:
    """Server events → conversation state → audio, records and control events."""
    conv = ctx.conversation

    async def store(action: Any) -> None:
        try:
            records.send_nowait(action)
        except trio.WouldBlock:
            ctx.stats.record_waits += 1
            log.warning("recorder is behind (%d records queued): waiting for it",
                        RECORDS_BOUND)
            await records.send(action)

    async def route(actions: list[p.Action]) -> None:
        for a in actions:
            if isinstance(a, p.Play):
                pcm = np.frombuffer(a.pcm, dtype="<i2")
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
                    log.info("barge-in: reply %s stopped after %.2f s", item, played / p.RATE)
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

    async with audio, records, control:
        try:
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed as exc:
                    if not (ctx.stopping or ctx.closing):
                        reason = exc.reason
                        fatal.append(RuntimeFailure(
                            "connection to the Realtime service lost"
                            + (f" (close code {reason.code})" if reason else "")))
                        await store(p.StoreError("connection_lost", None,
                                                 str(reason) if reason else "", False))
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
                now = time.time()
                if isinstance(event, p.InputCommitted):
                    ctx.pending_user_items.add(event.item_id)
                elif isinstance(event, p.UserTranscriptFailed):
                    ctx.pending_user_items.discard(event.item_id)
                await route(conv.receive(event, now))
                console.status(_status(ctx))
                if isinstance(event, p.SessionUpdated) and on_configured:
                    on_configured()
                if isinstance(event, p.ServiceError) and event.fatal:
                    fatal.append(ConfigError(
                        f"the Realtime service refused: {event.message}"
                        + (f" ({event.code})" if event.code else "")))
                    break
                ctx.watch.changed()
        finally:
            with trio.CancelScope(shield=True):
                for a in conv.flush(time.time()):
                    await store(a)
            ctx.stopping = ctx.stopping or bool(fatal)
            ctx.watch.changed()
    if fatal:
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            await ws.aclose()


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
    if isinstance(action, p.StoreError):
        return [("record_error", {"source": "service", "type": action.type, "code": action.code,
                                  "message": action.message})]
    if isinstance(action, p.StoreSession):
        return [("set_service_session_id", {"service_session_id": action.service_session_id})]
    raise TypeError(f"not a record: {action!r}")
