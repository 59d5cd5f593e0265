"""Wake-word listening (``R2D2_LISTEN=wake``): nothing leaves the board until it is called.

The capture runs for the whole run. While waiting, its frames go through the wake-word detector
only: no connection to the service exists. A wake (the word, or an external trigger such as
``r2d2voice wake``) plays the chirp and opens one conversation (:func:`converse`: one session
row), which is sent the frames since the wake first (the pre-roll, held while connecting), then
live frames. After ``idle_s`` with no user speech and no reply playing, or when the connection
ends by itself (``end_conversation``, a lost link), the falling whistle, the connection closes,
and the detector listens again. Earcons are never sent: in half duplex the microphone frames
heard while the chirp plays (and for the echo tail) are held back as the link holds back a
reply's echo, unless the user talks over it; the reply WAV of a replay skips them.

Tasks and channels (one nursery):

=====================  ===============  ==================================================
channel                bound            when full
=====================  ===============  ==================================================
capture → router       50 frames (1 s)  microphone: drop the newest frame, count it (capture
                                        never blocks); a file: the reader waits
router → conversation  10 s of frames   drop the oldest frame, count it (:class:`FrameQueue`;
                                        the router never waits on the link)
router → runner        1 wake           never fills: a wake is taken only while waiting
replies, earcons →     256 chunks       replies: the port waits (the sink only queues them);
  the run's sink                        an earcon that does not fit is dropped and logged
=====================  ===============  ==================================================

A file (``replay --listen wake``) is read as fast as the channel takes it and paced by the
router: at 20 ms a frame throughout with ``--speed realtime``; in fast mode, at 20 ms a frame
from a wake until its connection is closed and as fast as the detector goes while waiting, so
both speeds give the same conversations (the detector counts audio, not time).

Stopping (SIGTERM): the capture is cancelled, the conversation in progress is stopped (its own
``STOP_GRACE`` and recorder deadlines), the run's sink has ``STOP_GRACE`` to finish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from r2d2voice.appliance.compose import LinkOptions, Outcome, converse, link_policy
from r2d2voice.appliance.context import Console, Context, Sink, Source, Stopper
from r2d2voice.appliance.pipeline import AUDIO_BOUND, FRAMES_BOUND, STOP_GRACE
from r2d2voice.appliance.sources import FileSource
from r2d2voice.appliance.wake_feed import (
    ENDED,
    IDLE,
    NO_SERVICE,
    PREROLL_SECONDS,
    STOPPED,
    ConversationFeed,
    FrameQueue,
    SinkPort,
)
from r2d2voice.audio import earcons
from r2d2voice.audio.gates import EchoGate
from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.audio.wake import Wake, WakeWordDetector
from r2d2voice.link.state import Quiet
from r2d2voice.realtime.conversation import Conversation
from r2d2voice.storage.recorder import AsyncStore
from r2d2voice.system.config import Settings

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("r2d2voice.appliance.listening")

__all__ = ["LATE_METADATA_KEYS", "METADATA_KEYS", "PREROLL_SECONDS", "Heard", "Listening",
           "WakeTrigger", "WakeWordConversation", "listen_for_wake"]

PREROLL_FRAMES = round(PREROLL_SECONDS * RATE / FRAME_SAMPLES)
FRAME_S = FRAME_SAMPLES / RATE
#: a wake comes from the detector or from outside (``r2d2voice wake``, SIGUSR1)
WORD, EXTERNAL = "word", "external"


class WakeTrigger:
    """External wakes: hand :meth:`wake` to ``serve_control`` (control socket, SIGUSR1). Call it
    from the trio thread; it takes effect at the next microphone frame, and is ignored during
    a conversation."""

    def __init__(self) -> None:
        self.pending = False

    def wake(self) -> None:
        self.pending = True

    def take(self) -> bool:
        pending, self.pending = self.pending, False
        return pending


@dataclass(frozen=True)
class Heard:
    """A wake: from the word (with the detector's score) or from outside."""

    source: str  # WORD or EXTERNAL
    score: float | None
    at_s: float  # seconds of audio since the capture started
    time: float  # trio's clock


@dataclass
class WakeWordConversation:
    """One conversation: its wake, its sessions, how long it took and why it ended."""

    heard: Heard
    outcome: Outcome
    ready_ms: float | None  # wake → the service configured (None: never)
    seconds: float  # wake → connection closed
    ended: str  # see wake_feed: idle, ended, end of input, stopped

    @property
    def session_ids(self) -> list[str]:
        return list(self.outcome.ctx.session_ids) if self.outcome.ctx else []


@dataclass
class Listening:
    """What a wake-word run did."""

    conversations: list[WakeWordConversation] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def session_ids(self) -> list[str]:
        return [sid for c in self.conversations for sid in c.session_ids]

    @property
    def session_id(self) -> str:
        """The first session's id ("-": none), like :class:`Outcome`."""
        ids = self.session_ids
        return ids[0] if ids else "-"

    @property
    def assistant_turns(self) -> int:
        return sum(c.outcome.ctx.stats.assistant_turns for c in self.conversations
                   if c.outcome.ctx)


async def listen_for_wake(
    settings: Settings,
    source: Source,
    sink: Sink,
    *,
    wake_word: str | None = None,
    idle_s: float | None = None,
    earcons_on: bool | None = None,
    trigger: WakeTrigger | None = None,
    console: Console | None = None,
    stopper: Stopper | None = None,
    on_ready: Callable[[], None] | None = None,
    metadata: dict[str, Any] | None = None,
    buffer: PlayoutBuffer | None = None,
    **link: Unpack[LinkOptions],
) -> Listening:
    """Listen for the wake word on ``source`` until it ends or ``stopper`` fires; hold one
    conversation per wake (what :func:`converse` does in ``always`` mode). ``wake_word``,
    ``idle_s`` and ``earcons_on`` default to the settings; ``on_ready()`` once the first
    microphone frame has been heard; ``metadata`` goes into every session row (the wake keys
    are added, see :data:`METADATA_KEYS`). A :class:`FileSource` is paced as the module
    docstring says. ``link`` (url, policy, toolbox, connect, on_store_status, ship): passed
    to :func:`converse` as they are, for each conversation. ConfigError for an unknown wake
    word (before anything starts)."""
    detector = WakeWordDetector(wake_word or settings.wake_word)
    try:
        listener = _Listener(
            settings, source, sink, detector, wake_word=wake_word or settings.wake_word,
            idle_s=idle_s if idle_s is not None else settings.conversation_idle_s,
            earcons_on=settings.earcons if earcons_on is None else earcons_on,
            trigger=trigger, console=console or Quiet(), stopper=stopper or Stopper(),
            on_ready=on_ready, metadata=metadata or {}, buffer=buffer or PlayoutBuffer(),
            link=link)
        return await listener.run()
    finally:
        detector.close()


#: the keys each wake-word conversation adds to its session's metadata: at the start, and
#: (once it is over) the late ones
METADATA_KEYS = ("listen", "wake_source", "wake_word", "wake_score", "wake_at_s")
LATE_METADATA_KEYS = ("wake_ready_ms", "conversation_s", "conversation_end")


@dataclass
class _Episode:
    """A wake and its conversation, as the router sees it."""

    heard: Heard
    queue: FrameQueue
    done: bool = False  # the conversation no longer takes frames: back to the detector
    over: bool = False  # its connection is closed (a file is paced until then)


@dataclass(eq=False)
class _Listener:
    """The run: capture → router (detector, conversation queue) → one conversation at a time;
    the run's sink takes replies and earcons."""

    settings: Settings
    source: Source
    sink: Sink
    detector: WakeWordDetector
    wake_word: str
    idle_s: float
    earcons_on: bool
    trigger: WakeTrigger | None
    console: Console
    stopper: Stopper
    on_ready: Callable[[], None] | None
    metadata: dict[str, Any]
    buffer: PlayoutBuffer
    #: passed on to :func:`converse` as they are
    link: LinkOptions
    episode: _Episode | None = None
    conversation_stopper: Stopper | None = None
    earcons_played: int = 0
    result: Listening = field(default_factory=Listening)
    capture_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sink_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    _sink_send: trio.MemorySendChannel[AudioChunk] | None = None
    _t0: float = 0.0
    _pace_from: tuple[int, float] = (0, 0.0)  # (frame index, trio time) frames are paced from
    #: the current wake's chirp gate (half duplex on a microphone only)
    _gate: EchoGate | None = None

    def __post_init__(self) -> None:
        self.waiting_status = f"waiting for '{self.detector.wake_word.lower()}'"
        self.file = self.source if isinstance(self.source, FileSource) else None
        #: a file's frames are paced here: throughout (realtime), or during conversations
        self.pace_always = self.file is not None and self.file.realtime
        policy = self.link.get("policy") or link_policy(self.settings, self.source)
        self.half_duplex = policy if self.source.live and policy.duplex == "half" else None

    async def run(self) -> Listening:
        started = trio.current_time()
        frames_send, frames_recv = trio.open_memory_channel[bytes](FRAMES_BOUND)
        wakes_send, wakes_recv = trio.open_memory_channel[_Episode](1)
        sink_send, sink_recv = trio.open_memory_channel[AudioChunk](AUDIO_BOUND)
        self._sink_send = sink_send
        self.stopper.on_stop(self._on_stop)
        self.console.status(self.waiting_status)
        log.info("listening for %r on the board: nothing is sent until it is heard",
                 self.detector.wake_word)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._capture, frames_send)
            nursery.start_soon(self._route, frames_recv, wakes_send)
            nursery.start_soon(self._play, sink_recv)
            async with sink_send:
                await self._conversations(wakes_recv)
        self.result.wall_seconds = trio.current_time() - started
        return self.result

    def _on_stop(self) -> None:
        self.capture_scope.cancel()
        if self.conversation_stopper is not None:
            self.conversation_stopper.stop(self.stopper.reason or STOPPED)
        self.sink_scope.deadline = min(self.sink_scope.deadline,
                                       trio.current_time() + STOP_GRACE)

    # -- capture, routing, playback --------------------------------------------------------
    async def _capture(self, send: trio.MemorySendChannel[bytes]) -> None:
        async with send:
            with self.capture_scope:
                if self.file is not None:
                    await self.file.stream(send)
                else:  # the microphone: its context is never looked at
                    await self.source.run(send, Context(Conversation(), self.buffer))

    async def _route(self, frames: trio.MemoryReceiveChannel[bytes],
                     wakes: trio.MemorySendChannel[_Episode]) -> None:
        """Every frame goes through the detector; during a conversation also to it."""
        async with frames, wakes:
            index = 0
            async for frame in frames:
                if index == 0:
                    self._t0 = trio.current_time()
                    if self.on_ready is not None:
                        self.on_ready()
                await self._pace(index)
                index += 1
                heard = self.detector.process(frame)
                external = self.trigger is not None and self.trigger.take()
                episode = self.episode
                if episode is not None and not episode.done:
                    self._hand_over(frame, episode.queue)
                    if heard or external:
                        log.info("woken during a conversation: ignored")
                elif heard or external:
                    self._wake(heard, index, wakes)
            if self.episode is not None:
                self.episode.queue.close()

    def _hand_over(self, frame: bytes, queue: FrameQueue) -> None:
        """The frame to the conversation. In half duplex the chirp's echo is held back like a
        reply's (the link's gate only sees the queue when it is sent, too late): frames heard
        while it plays, and for the echo tail, are dropped unless the user talks over it."""
        if self._gate is None:
            queue.put(frame)
            return
        item = self.buffer.playing_item()
        chirping = item is not None and earcons.is_earcon(item)
        for passed in self._gate.filter(frame, trio.current_time(), chirping):
            queue.put(passed)

    async def _pace(self, index: int) -> None:
        episode = self.episode
        if self.pace_always:
            await trio.sleep_until(self._t0 + index * FRAME_S)
        elif self.file is not None and episode is not None and not episode.over:
            first, at = self._pace_from
            await trio.sleep_until(at + (index - first) * FRAME_S)

    def _wake(self, heard: Wake | None, index: int,
              wakes: trio.MemorySendChannel[_Episode]) -> None:
        now = trio.current_time()
        at_s = index * FRAME_S
        if heard is not None:
            wake = Heard(WORD, heard.score, round(at_s, 2), now)
            log.info("wake word %r heard (score %.3f) at %.2f s", heard.wake_word, heard.score,
                     at_s)
        else:
            wake = Heard(EXTERNAL, None, round(at_s, 2), now)
            log.info("woken from outside (r2d2voice wake) at %.2f s", at_s)
        episode = self.episode = _Episode(wake, FrameQueue(PREROLL_FRAMES))
        self._pace_from = (index, now + FRAME_S)  # the next frame comes 20 ms after this one
        self._gate = self.half_duplex.echo_gate() if self.half_duplex else None
        self._earcon("chirp", earcons.chirp())
        try:
            wakes.send_nowait(episode)  # never full: see the module docstring
        except (trio.WouldBlock, trio.BrokenResourceError):
            log.info("stopping: no conversation for this wake")
            episode.done = True

    def _earcon(self, name: str, pcm: np.ndarray) -> None:
        if not self.earcons_on or self._sink_send is None:
            return
        self.earcons_played += 1
        try:
            self._sink_send.send_nowait(earcons.earcon_chunk(f"{name}-{self.earcons_played}",
                                                             pcm))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("the speaker is busy or gone: %s earcon not played", name)

    async def _play(self, receive: trio.MemoryReceiveChannel[AudioChunk]) -> None:
        with self.sink_scope:
            async with receive:
                await self.sink.run(receive, self.buffer)

    # -- conversations -----------------------------------------------------------------------
    async def _conversations(self, wakes: trio.MemoryReceiveChannel[_Episode]) -> None:
        async with wakes:
            async for episode in wakes:
                if self.stopper.reason is not None:
                    break
                self.result.conversations.append(await self._converse(episode))
                self.console.status(self.waiting_status)

    async def _converse(self, episode: _Episode) -> WakeWordConversation:
        heard = episode.heard
        stopper = self.conversation_stopper = Stopper()
        ready: list[float] = []

        def configured() -> None:
            if not ready:
                ready.append(trio.current_time())

        def ended(reason: str, ctx: Context) -> None:
            episode.done = True
            episode.queue.close()
            if reason in (IDLE, ENDED, NO_SERVICE):
                self._earcon("whistle", earcons.whistle())
            if reason in (ENDED, NO_SERVICE) or not ctx.connected:
                stopper.stop(reason)  # no further connection for this conversation

        feed = ConversationFeed(episode.queue, live=bool(self.source.live), idle_s=self.idle_s,
                                on_end=ended)
        assert self._sink_send is not None
        metadata = {**self.metadata, "listen": "wake", "wake_source": heard.source,
                    "wake_word": self.wake_word, "wake_score": heard.score,
                    "wake_at_s": heard.at_s}
        self.console.status("in conversation (connecting)")
        self.source.set_urgent(True)  # barge-in and turn ends at once, not in 100 ms batches
        try:
            outcome = await converse(
                self.settings, feed, SinkPort(self._sink_send),
                console=_InConversation(self.console), stopper=stopper,
                on_configured=configured, metadata=metadata, buffer=self.buffer, **self.link)
        finally:
            self.source.set_urgent(False)
            self.conversation_stopper = None
            episode.done = episode.over = True
            episode.queue.close()
        done = WakeWordConversation(
            heard, outcome, round((ready[0] - heard.time) * 1000, 1) if ready else None,
            round(trio.current_time() - heard.time, 2), feed.reason or STOPPED)
        log.info("conversation over (%s) after %.1f s; the service was ready %s after the wake",
                 done.ended, done.seconds,
                 "never" if done.ready_ms is None else f"{done.ready_ms:.0f} ms")
        await self._annotate(done)
        return done

    async def _annotate(self, done: WakeWordConversation) -> None:
        """The late metadata keys, once the conversation is over."""
        if not done.session_ids:
            log.warning("the service could not be reached for this conversation")
            return
        values = {"wake_ready_ms": done.ready_ms, "conversation_s": done.seconds,
                  "conversation_end": done.ended}
        store = await AsyncStore.open(self.settings.db, store_text=self.settings.store_text)
        try:
            for session_id in done.session_ids:
                await store.update_session_metadata(session_id, values)
        finally:
            await store.aclose()


class _InConversation:
    """The run's console during a conversation: statuses say so."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def transcript(self, role: str, text: str) -> None:
        self.console.transcript(role, text)

    def status(self, text: str) -> None:
        self.console.status(f"in conversation ({text})")
