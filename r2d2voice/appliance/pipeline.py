"""The one nursery of every run: source → microphone chain (echo gate, session gate) →
uplink → [service] → downlink → playback / recorder.

Channels and their policies (the only places that can fill up):

====================  ==========  ==========================================================
channel               bound       when full
====================  ==========  ==========================================================
source → chain        50 frames   live capture: drop the newest frame and count it (capture
                      (1 s)       never blocks); a file: 0, hands each frame over (waits)
chain → uplink        50 frames   live: drop the newest frame and count it (stale frames left
                      (1 s)       at a reconnect are dropped and counted); a file: wait
downlink → playback   256 chunks  drop the chunk and count it (the downlink never waits on the
                                  speaker); the playout buffer behind it holds ≤ 60 s and
                                  drops its oldest audio beyond that; the session gate's
                                  earcons share it, dropped (and logged) when it is full
downlink → recorder   256 records wait, and log that it waited (transcripts are never dropped)
downlink → uplink     16 events   wait (control events are few and small; link/connection.py)
downlink → tools      8 calls     wait (the runner starts each at once; link/tools.py)
tools → link          16 results  the finished call waits (never the downlink)
====================  ==========  ==========================================================

Source, chain, playback and recorder live for the whole run, whatever the way of listening; the
session gate (``gate.py``) says when a conversation exists, and the link supervisor
(``link/supervisor.py``) runs its connections (one service session each), and the model's tool
calls in tasks of its own (a tool outlives a reconnect; see ``link/tools.py``).

Shutdown order. End of stream flows by closing channels: the source closes its channel → the
uplink waits for the open turns to be answered and closes the websocket → the supervisor closes
the playback and recorder channels → playback drains, the recorder drains. ``Stopper.stop()``
(SIGTERM, Ctrl-C, timeout) cancels the source and skips the waiting; a ``STOP_GRACE`` deadline
backs it up. The recorder lives outside that deadline so nothing received is lost, within its
own ``RECORD_DRAIN`` deadline (systemd's TimeoutStopSec is 15 s).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import trio

from r2d2voice.appliance.chain import FilePacer, MicChain
from r2d2voice.appliance.context import Sink, Source, Stopper
from r2d2voice.appliance.gate import WakeGate, WakeWordConversation, wake_gate
from r2d2voice.appliance.sources import FileSource
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.appliance.tools.port import ToolboxPort
from r2d2voice.audio.earcons import earcon_chunk
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.moments import Moments
from r2d2voice.link.parts import LinkParts
from r2d2voice.link.state import LinkState, Statistics
from r2d2voice.link.supervisor import Supervisor
from r2d2voice.link.turns import LinkView, TurnGate
from r2d2voice.protocol.actions import Record
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


@dataclass
class Run:
    """One run's settings and collaborators, built once at composition (``compose.py``)."""

    link: LinkParts
    source: Source
    sink: Sink
    #: ``record(session_id, batch)`` receives batches of Store* records; it must not drop them
    record: Recorder
    stopper: Stopper = field(default_factory=Stopper)
    #: its clock must be callable from the sink's audio thread
    buffer: PlayoutBuffer = field(default_factory=PlayoutBuffer)
    #: runs the model's function calls and sets the playback volume (None: calls rejected)
    toolbox: Toolbox | None = None


@dataclass(frozen=True)
class RunResult:
    """What a run did: its sessions, the link's counters, its woken conversations."""

    session_ids: list[str]
    stats: Statistics
    conversations: list[WakeWordConversation]
    stopped: bool

    @property
    def session_id(self) -> str:
        """The first session's id ("-": none)."""
        return self.session_ids[0] if self.session_ids else "-"


async def run_pipeline(run: Run) -> RunResult:
    """Run from source to sink until the source ends and every turn is answered, or until the
    stopper fires (see the module docstring for the shutdown order).

    Raises ConfigError for a rejected key or a fatal service error, RuntimeFailure when the
    connection is lost and the policy does not reconnect — in every case after everything
    received has been recorded.
    """
    parts, source, buffer = run.link, run.source, run.buffer
    state = LinkState(Conversation(), buffer, moments=Moments(parts.events))
    gate: Any = parts.gate  # a SessionGate that the chain routes through (gate.py)
    wake = wake_gate(gate)
    if run.toolbox is not None:
        buffer.set_gain(run.toolbox.volume.gain)
        run.toolbox.volume.subscribe(buffer.set_gain)
        parts.tools = parts.offer = tool_caller(run.toolbox)

    # a live microphone's frames wait for the chain at most 1 s (it drains them at once); a
    # file's are handed over one by one, so the only queue is the uplink's (stale frames of a
    # dead link are dropped there, and a replay's turn-taking sees what the link has)
    frames_send, frames_recv = trio.open_memory_channel[bytes](FRAMES_BOUND if source.live
                                                                else 0)
    uplink_send, uplink_recv = trio.open_memory_channel[bytes](FRAMES_BOUND)
    audio_send, audio_recv = trio.open_memory_channel[AudioChunk](AUDIO_BOUND)
    records_send, records_recv = trio.open_memory_channel[tuple[str, Record]](RECORDS_BOUND)
    earcons = _Earcons(audio_send.clone())
    gate.attach(LinkView(state), earcons.play)
    echo = parts.policy.echo_gate() if source.live and parts.policy.duplex == "half" else None
    file_pacer = (FilePacer(gate) if wake is not None and isinstance(source, FileSource)
                  and not source.realtime else None)
    urgency = _Urgency(source, wake)
    chain = MicChain(gate, live=source.live, echo=echo, pace=file_pacer,
                     speaker_busy=lambda: (buffer.queued_samples() > 0
                                           or audio_send.statistics().current_buffer_used > 0),
                     urgent=urgency.follow)
    parts.busy = urgency.busy
    parts.counters = lambda: {"frames_dropped": source.frames_dropped + chain.dropped,
                              "frames_gated": chain.gated,
                              "underruns": buffer.statistics().underruns}
    configured = parts.on_configured
    if wake is not None:
        parts.on_configured = _both(wake.configured, configured)
    turns = None if wake is not None else TurnGate(state)
    link = Supervisor(parts, state)
    stop_playout = state.follow_playout()
    stop_level = state.moments.follow_level(buffer)
    try:
        async with trio.open_nursery() as outer:
            recorder = _Recorder(run.record)
            outer.start_soon(recorder.run, records_recv)
            with trio.CancelScope() as inner_scope:
                source_scope = trio.CancelScope()

                def _on_stop() -> None:
                    state.stopping = True
                    source_scope.cancel()
                    now = trio.current_time()
                    inner_scope.deadline = min(inner_scope.deadline, now + STOP_GRACE)
                    recorder.stop_by(now + STOP_GRACE + RECORD_DRAIN)
                    state.watch.changed()

                run.stopper.on_stop(_on_stop)
                async with trio.open_nursery() as inner:

                    async def source_task() -> None:
                        # the source owns and closes its channel end; closing it here too
                        # covers a source cancelled before it got that far
                        async with frames_send:
                            with source_scope:
                                await source.run(frames_send, turns)

                    async def sink_task() -> None:
                        # what the speaker does is told (speaking, spoken) while it plays,
                        # past the link's last connection
                        async with trio.open_nursery() as speaker:
                            speaker.start_soon(state.moments.follow, state)
                            async with audio_recv:
                                await run.sink.run(audio_recv, buffer)
                            speaker.cancel_scope.cancel()
                        state.moments.finish(state)

                    inner.start_soon(source_task)
                    inner.start_soon(chain.run, frames_recv, uplink_send)
                    inner.start_soon(sink_task)
                    async with earcons.send:
                        await link.run(uplink_recv, audio_send, records_send)
                    if link.failure is not None:
                        _on_stop()  # the source and the speaker need not go on
                    # no conversation will open (the input ended, or the session gate
                    # closed for good, as a spent budget does for a file): nothing more to read
                    source_scope.cancel()
    finally:
        stop_playout()
        stop_level()
    if link.failure is not None:
        raise link.failure
    return RunResult(state.session_ids, replace(state.stats),
                     wake.conversations if wake is not None else [], state.stopping)


def tool_caller(toolbox: Toolbox) -> ToolboxPort:
    """The link's view of a Toolbox: one call in, its audit result out (``ToolCaller``), and
    the tools on offer as they change, the person's words (``ToolOffer``)."""
    return ToolboxPort(toolbox)


def _both(first: Callable[[], None], second: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        first()
        if second is not None:
            second()

    return both


class _Urgency:
    """Tells the source to hand audio over frame by frame while a turn is open, a reply plays
    or a woken conversation is on, and in batches otherwise (only when that changes)."""

    def __init__(self, source: Source, wake: WakeGate | None) -> None:
        self.source = source
        self.wake = wake
        self._busy = False
        self._said = False  # sources start batched

    def busy(self, busy: bool) -> None:
        self._busy = busy
        self.follow()

    def follow(self) -> None:
        urgent = self._busy or (self.wake is not None and self.wake.conversing)
        if urgent != self._said:
            self._said = urgent
            self.source.set_urgent(urgent)


class _Earcons:
    """The session gate's sounds, on their way to the speaker beside the replies (the sink
    skips them in a reply WAV). Policy: never waits; an earcon that does not fit is dropped
    and logged."""

    def __init__(self, send: trio.MemorySendChannel[AudioChunk]) -> None:
        self.send = send
        self.played = 0

    def play(self, name: str, pcm: np.ndarray) -> None:
        self.played += 1
        try:
            self.send.send_nowait(earcon_chunk(f"{name}-{self.played}", pcm))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("the speaker is busy or gone: %s earcon not played", name)


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
