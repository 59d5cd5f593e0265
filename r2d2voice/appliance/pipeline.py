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
downlink → uplink     16 events   wait (control events are few and small; link/connection.py)
downlink → tools      8 calls     wait (the runner starts each at once; link/tools.py)
tools → link          16 results  the finished call waits (never the downlink)
====================  ==========  ==========================================================

Source, playback and recorder live for the whole run; the link supervisor
(``link/supervisor.py``) runs one connection (one service session) after another, and the
model's tool calls in tasks of its own (a tool outlives a reconnect; see ``link/tools.py``).

Shutdown order. End of stream flows by closing channels: the source closes its channel → the
uplink waits for the open turns to be answered and closes the websocket → the supervisor closes
the playback and recorder channels → playback drains, the recorder drains. ``Stopper.stop()``
(SIGTERM, Ctrl-C, timeout) cancels the source and skips the waiting; a ``STOP_GRACE`` deadline
backs it up. The recorder lives outside that deadline so nothing received is lost, within its
own ``RECORD_DRAIN`` deadline (systemd's TimeoutStopSec is 15 s).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress

import trio

from r2d2voice.appliance.context import Console, Context, Sessions, Sink, Source, Stopper
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.appliance.tools.port import ToolboxPort
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.state import LinkPolicy, Quiet
from r2d2voice.link.supervisor import Supervisor
from r2d2voice.link.transport import Connector, Endpoint, open_realtime
from r2d2voice.protocol.actions import Record
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.realtime.conversation import Conversation

log = logging.getLogger("r2d2voice.appliance.pipeline")

FRAMES_BOUND = 50  # 1 s of 20 ms frames
AUDIO_BOUND = 256
RECORDS_BOUND = 256
#: after a stop, the source, link and speaker have this long to finish
STOP_GRACE = 2.0
#: after a stop, the recorder has this long (after STOP_GRACE) to write what was received
RECORD_DRAIN = 8.0
#: records written in one batch (one transaction)
RECORD_BATCH = 64

Recorder = Callable[[str, list[Record]], Awaitable[None]]


async def run_conversation(
    endpoint: Endpoint,
    session_config: SessionConfig,
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
    connect: Connector = open_realtime,
    buffer: PlayoutBuffer | None = None,
    rng: random.Random | None = None,
    toolbox: Toolbox | None = None,
) -> Context:
    """Run a conversation from source to sink until the source ends and every turn is
    answered, or until ``stopper`` fires. ``record(session_id, batch)`` receives batches of
    Store* records (the recorder task calls it; it must not drop them).

    ``connect`` opens a transport (a websocket by default), ``buffer`` is the playout buffer
    (its clock must be callable from the sink's audio thread), ``rng`` jitters the backoff.
    ``toolbox`` runs the model's function calls (offer its ``session_tools()`` in
    ``session_config``) and sets the playback volume; without it every call is rejected.

    Raises ConfigError for a rejected key or a fatal service error, RuntimeFailure when the
    connection is lost and ``policy.reconnect`` is off — in every case after everything received
    has been recorded.
    """
    console = console or Quiet()
    stopper = stopper or Stopper()
    policy = policy or LinkPolicy()
    ctx = Context(Conversation(), buffer or PlayoutBuffer())
    if source.live and policy.duplex == "half":
        ctx.gate = policy.echo_gate()
    _wake_on_playout(ctx)
    caller = None
    if toolbox is not None:
        ctx.buffer.set_gain(toolbox.volume.gain)
        toolbox.volume.subscribe(ctx.buffer.set_gain)
        caller = tool_caller(toolbox)

    frames_send, frames_recv = trio.open_memory_channel[bytes](FRAMES_BOUND)
    audio_send, audio_recv = trio.open_memory_channel[AudioChunk](AUDIO_BOUND)
    records_send, records_recv = trio.open_memory_channel[tuple[str, Record]](RECORDS_BOUND)
    link = Supervisor(endpoint, connect, session_config, source, sessions, ctx, policy, console,
                      settle_seconds=settle_seconds, on_configured=on_configured, rng=rng,
                      tools=caller, offer=caller)
    try:
        async with trio.open_nursery() as outer:
            recorder = _Recorder(record)
            outer.start_soon(recorder.run, records_recv)
            with trio.CancelScope() as inner_scope:
                source_scope = trio.CancelScope()

                def _on_stop() -> None:
                    ctx.stopping = True
                    source_scope.cancel()
                    now = trio.current_time()
                    inner_scope.deadline = min(inner_scope.deadline, now + STOP_GRACE)
                    recorder.stop_by(now + STOP_GRACE + RECORD_DRAIN)
                    ctx.watch.changed()

                stopper.on_stop(_on_stop)
                async with trio.open_nursery() as inner:

                    async def source_task() -> None:
                        # the source owns and closes its channel end; closing it here too
                        # covers a source cancelled before it got that far
                        async with frames_send:
                            with source_scope:
                                await source.run(frames_send, ctx)

                    async def sink_task() -> None:
                        async with audio_recv:
                            await sink.run(audio_recv, ctx.buffer)

                    inner.start_soon(source_task)
                    inner.start_soon(sink_task)
                    await link.run(frames_recv, audio_send, records_send)
                    if link.failure is not None:
                        _on_stop()  # the source and the speaker need not go on
    finally:
        ctx.buffer.set_listener(None)
    if link.failure is not None:
        raise link.failure
    return ctx


def tool_caller(toolbox: Toolbox) -> ToolboxPort:
    """The link's view of a Toolbox: one call in, its audit result out (``ToolCaller``), and
    the tools offered now, the person's words, remote MCP items (``ToolOffer``)."""
    return ToolboxPort(toolbox)


def _wake_on_playout(ctx: Context) -> None:
    """The playout buffer starts, drains and starts items on the audio thread: each of those
    wakes the run's watchers (status, recycle timer, echo gate) instead of polling."""
    token = trio.lowlevel.current_trio_token()
    changed = ctx.watch.changed

    def notify() -> None:
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(changed, idempotent=True)

    ctx.buffer.set_listener(notify)


class _Recorder:
    """The only writer of transcripts: batches whatever is already queued, commits at once.

    A write is never interrupted by a stop: each runs shielded, bounded only by the drain
    deadline that a stop sets (``stop_by``); whatever is left then is counted and logged loudly.
    """

    def __init__(self, record: Recorder) -> None:
        self.record = record
        self.deadline = float("inf")
        self._scopes: list[trio.CancelScope] = []

    def stop_by(self, deadline: float) -> None:
        self.deadline = min(self.deadline, deadline)
        for scope in self._scopes:
            scope.deadline = self.deadline

    async def run(self, receive: trio.MemoryReceiveChannel[tuple[str, Record]]) -> None:
        written = 0
        async with receive:
            with self._scope() as scope:
                async for first in receive:
                    batch = [first]
                    while len(batch) < RECORD_BATCH:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    by_session: dict[str, list[Record]] = {}
                    for session_id, action in batch:
                        by_session.setdefault(session_id, []).append(action)
                    with self._scope(shield=True):
                        for session_id, actions in by_session.items():
                            await self.record(session_id, actions)
                    written += len(batch)
            if scope.cancelled_caught:
                left = receive.statistics().current_buffer_used
                log.error("recorder: stopped at its deadline with %d records unwritten "
                          "(%d written)", left, written)

    @contextmanager
    def _scope(self, shield: bool = False) -> Iterator[trio.CancelScope]:
        scope = trio.CancelScope(shield=shield, deadline=self.deadline)
        self._scopes.append(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.remove(scope)
