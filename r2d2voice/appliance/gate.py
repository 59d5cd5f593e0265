"""Whether a session exists: the one policy the link's supervisor consults (``SessionGate``).

- :class:`AlwaysGate` (``R2D2_LISTEN=always``): a session from the start; after the robot hung
  up (``end_conversation``) none until someone speaks again — for a live microphone a local
  energy VAD with the session's parameters hears them and the speech so far (with the prefix
  padding) is the next session's pre-roll; for a file, at once (a file is a user who keeps
  talking).
- :class:`WakeGate` (``R2D2_LISTEN=wake``): nothing leaves the board until the wake word (or
  ``r2d2voice wake``) is heard; then the chirp, one conversation (its frames since the wake
  held while connecting, at most :data:`PREROLL_SECONDS`), and after ``idle_s`` with nothing
  said, played or pending, or when the connection ends by itself, the whistle and back to
  waiting. A service that takes nothing within :data:`PREROLL_SECONDS` is given up on.

The microphone chain (``appliance/chain.py``) hands each gate every frame (:meth:`route`); the
gate says which frames go on to the link now. The pipeline hands each gate the link's typed waits
and the speaker (``attach``). A policy wrapped around a gate (the budget,
``budget.py``: it has the gate as ``inner``) may keep conversations from opening: meanwhile it
asks the gate whether someone addressed the robot (``heard``, which opens nothing), and it may
close the conversation in progress for a reason of its own (``closed_by``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from r2d2voice.audio import earcons
from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE
from r2d2voice.audio.vad import EnergyVad, SpeechStarted
from r2d2voice.audio.wake import WakeWordDetector
from r2d2voice.link.state import Console, Opening
from r2d2voice.link.turns import LinkView
from r2d2voice.protocol.core import End, EndReason
from r2d2voice.system.events import Events

log = logging.getLogger("r2d2voice.appliance.gate")

#: audio kept from before the onset, beyond the prefix padding (the VAD needs ~60 ms to decide)
PREROLL_MARGIN_MS = 200
#: at most this much audio is held for a woken conversation while it connects (drop-oldest); a
#: service that has not taken it within as long is given up on
PREROLL_SECONDS = 10.0
PREROLL_FRAMES = round(PREROLL_SECONDS * RATE / FRAME_SAMPLES)
FRAME_S = FRAME_SAMPLES / RATE
#: a wake comes from the detector or from outside (``r2d2voice wake``, SIGUSR1)
WORD, EXTERNAL = "word", "external"
#: why a woken conversation ended
IDLE, ENDED, NO_SERVICE, END_OF_INPUT, STOPPED = (
    "idle", "ended", "no service", "end of input", "stopped")
#: the keys each woken conversation adds to its session rows: at the start, and once it is over
METADATA_KEYS = ("listen", "wake_source", "wake_word", "wake_score", "wake_at_s")
LATE_METADATA_KEYS = ("wake_ready_ms", "conversation_s", "conversation_end")

Earcon = Callable[[str, np.ndarray], None]


class AlwaysGate:
    """``always``: see the module docstring. ``vad`` is (threshold, prefix ms, silence ms)."""

    def __init__(self, *, live: bool, vad: tuple[float, int, int], console: Console,
                 events: Events | None = None) -> None:
        self.live = live
        self.console = console
        self.events = events or Events()
        self.vad = vad
        self.conversations = 0
        self._dormant: EnergyVad | None = None
        self._kept: deque[bytes] = deque()
        self._preroll: list[bytes] | None = None
        self._heard = trio.Event()
        self._input_ended = False
        self._rest = False  # closed by a policy: no session until someone speaks
        self._listener: EnergyVad | None = None  # hears speech while a policy keeps it closed
        self.waiting_status = "listening for speech"

    def attach(self, link: LinkView, earcon: Earcon) -> None:
        """The pipeline's link and speaker (this gate needs neither)."""

    def route(self, frame: bytes, passed: list[bytes], index: int) -> list[bytes]:
        if self._dormant is None:
            return passed
        self._kept.append(frame)
        if any(isinstance(e, SpeechStarted)
               for e in self._dormant.feed(np.frombuffer(frame, "<i2"))):
            self._dormant = None
            self._preroll = list(self._kept)
            self._heard.set()
        return []

    def input_ended(self) -> None:
        self._input_ended = True
        self._heard.set()

    def heard(self, frame: bytes) -> str | None:
        """``speech`` when someone starts speaking in ``frame`` (opens nothing)."""
        if self._listener is None:
            self._listener = self._vad()
        started = any(isinstance(e, SpeechStarted)
                      for e in self._listener.feed(np.frombuffer(frame, "<i2")))
        return "speech" if started else None

    def closed_by(self, reason: str) -> None:
        """A policy ends the conversation (or keeps the next from opening): afterwards, no
        session until someone speaks, as after a hang-up."""
        self._rest = True

    def _vad(self) -> EnergyVad:
        threshold, prefix_ms, silence_ms = self.vad
        return EnergyVad(RATE, threshold=threshold, prefix_padding_ms=prefix_ms,
                         silence_duration_ms=silence_ms)

    def _sleep(self) -> None:
        """No session until someone speaks (a live microphone; a file talks on)."""
        self._rest = False
        if not self.live or self._input_ended:
            return
        prefix_ms = self.vad[1]
        self._dormant = self._vad()
        frames = (prefix_ms + PREROLL_MARGIN_MS) * RATE // 1000 // FRAME_SAMPLES
        self._kept = deque(maxlen=max(1, frames))
        self._heard = trio.Event()
        log.info("no session until someone speaks")

    async def wait_open(self) -> Opening | None:
        if self._rest:
            self._sleep()
        if self._dormant is not None:
            await self._heard.wait()
            if self._dormant is not None:  # the input ended first
                return None
        self.conversations += 1
        return Opening(new_conversation=True)

    def take_preroll(self) -> list[bytes] | None:
        preroll, self._preroll = self._preroll, None
        return preroll

    async def wait_close(self) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def ended(self, reason: EndReason) -> bool:
        if reason.kind is not End.HANGUP and not self._rest:
            return True
        self._sleep()
        return False

    async def over(self, session_ids: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        if self._dormant is not None:
            self.console.status("conversation ended; listening for speech")
            self.events.emit("listening")

    @property
    def conversing(self) -> bool:
        return self._dormant is None


@dataclass(frozen=True)
class Heard:
    """A wake: from the word (with the detector's score) or from outside."""

    source: str  # WORD or EXTERNAL
    score: float | None
    at_s: float  # seconds of audio since the capture started
    time: float  # trio's clock


@dataclass
class WakeWordConversation:
    """One woken conversation: its wake, its sessions, how long it took and why it ended."""

    heard: Heard
    session_ids: list[str] = field(default_factory=list)
    ready_ms: float | None = None  # wake → the service configured (None: never)
    seconds: float = 0.0  # wake → connection closed
    ended: str = STOPPED


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


class WakeGate:
    """``wake``: see the module docstring. ``annotate(session_id, values)`` stores the late
    metadata keys of a conversation once it is over."""

    def __init__(self, detector: WakeWordDetector, *, idle_s: float, wake_word: str,
                 console: Console, earcons: bool = True,
                 trigger: WakeTrigger | None = None, events: Events | None = None) -> None:
        self.detector = detector
        self.events = events or Events()
        self.idle_s = idle_s
        self.wake_word = wake_word
        self.console = console
        #: play the chirp and the whistle (the pipeline gives ``earcon`` its player)
        self.earcons = earcons
        self.earcon: Earcon | None = None
        self.trigger = trigger
        self.link: LinkView | None = None  # set by the pipeline once the link exists
        #: each wake heard (its source: word, external), whether or not it opens a conversation
        self.on_wake: Callable[[str], None] | None = None
        self.annotate: Callable[[str, dict[str, Any]], Any] | None = None
        self.conversations: list[WakeWordConversation] = []
        self.waiting_status = f"waiting for '{detector.wake_word.lower()}'"
        self._current: WakeWordConversation | None = None
        self._held: deque[bytes] | None = None
        self.dropped = 0  # pre-roll frames dropped while connecting (the oldest)
        self._woken = trio.Event()
        self._input_ended = False
        self._close_reason: str | None = None

    @property
    def conversing(self) -> bool:
        return self._current is not None

    def attach(self, link: LinkView, earcon: Earcon) -> None:
        """The pipeline's link (to know when it is connected and quiet) and its speaker (for
        the chirp and the whistle, unless earcons are off)."""
        self.link = link
        if self.earcons:
            self.earcon = earcon

    def _listen(self, frame: bytes) -> tuple[float | None, bool]:
        """The detector's score if it heard the word in ``frame``; an external wake pending."""
        heard = self.detector.process(frame)
        external = self.trigger is not None and self.trigger.take()
        return (heard.score if heard else None), external

    def heard(self, frame: bytes) -> str | None:
        """The wake's source (word, external) when ``frame`` woke the gate; opens nothing."""
        score, external = self._listen(frame)
        if score is None and not external:
            return None
        source = WORD if score is not None else EXTERNAL
        if self.on_wake is not None:
            self.on_wake(source)
        return source

    def closed_by(self, reason: str) -> None:
        """A policy ends the conversation in progress: its end is ``reason`` (no whistle: the
        policy makes its own sound)."""
        if self._current is not None and self._close_reason is None:
            self._close_reason = reason

    def route(self, frame: bytes, passed: list[bytes], index: int) -> list[bytes]:
        score, external = self._listen(frame)
        if self._current is not None:
            if score is not None or external:
                log.info("woken during a conversation: ignored")
            if self._held is None:
                return passed
            for kept in passed:
                if len(self._held) == self._held.maxlen:
                    self.dropped += 1
                self._held.append(kept)
            return []
        if score is not None or external:
            self._wake(score, index)
        return []

    def _wake(self, score: float | None, index: int) -> None:
        at_s = round((index + 1) * FRAME_S, 2)
        if score is not None:
            log.info("wake word %r heard (score %.3f) at %.2f s", self.detector.wake_word, score,
                     at_s)
        else:
            log.info("woken from outside (r2d2voice wake) at %.2f s", at_s)
        heard = Heard(WORD if score is not None else EXTERNAL, score, at_s, trio.current_time())
        self.events.emit("wake", source=heard.source, score=score)
        if self.on_wake is not None:
            self.on_wake(heard.source)
        self._current = WakeWordConversation(heard)
        self._held = deque(maxlen=PREROLL_FRAMES)
        self._close_reason = None
        self._play("chirp", earcons.chirp())
        self.console.status("in conversation (connecting)")
        self._woken.set()

    def _play(self, name: str, pcm: np.ndarray) -> None:
        if self.earcon is not None:
            self.earcon(name, pcm)

    def input_ended(self) -> None:
        self._input_ended = True
        self._woken.set()

    def configured(self) -> None:
        current = self._current
        if current is not None and current.ready_ms is None:
            current.ready_ms = round((trio.current_time() - current.heard.time) * 1000, 1)

    async def wait_open(self) -> Opening | None:
        if not self._woken.is_set():
            self.events.emit("waiting_for_wake")
        await self._woken.wait()
        self._woken = trio.Event()
        current = self._current
        if current is None:  # the input ended while waiting
            return None
        heard = current.heard
        return Opening(new_conversation=True, metadata={
            "listen": "wake", "wake_source": heard.source, "wake_word": self.wake_word,
            "wake_score": heard.score, "wake_at_s": heard.at_s})

    def take_preroll(self) -> list[bytes] | None:
        held, self._held = self._held, None
        return list(held or ())

    async def wait_close(self) -> str:
        assert self.link is not None
        with trio.move_on_after(PREROLL_SECONDS) as connecting:
            await self.link.wait_connected()
        if connecting.cancelled_caught:
            log.warning("the service took nothing within %.0f s of the wake: giving up",
                        PREROLL_SECONDS)
            self._close_reason = NO_SERVICE
            self._play("whistle", earcons.whistle())
            return NO_SERVICE
        await self.link.wait_quiet_for(self.idle_s)
        self._close_reason = IDLE
        self._play("whistle", earcons.whistle())
        return IDLE

    def ended(self, reason: EndReason) -> bool:
        if self._close_reason is None:
            if reason.kind is End.DONE and reason.detail == "input ended":
                self._close_reason = END_OF_INPUT
            elif reason.kind is End.DONE:
                self._close_reason = STOPPED
            else:  # the robot hung up, or the link was lost
                self._close_reason = ENDED
                self._play("whistle", earcons.whistle())
        return False

    async def over(self, session_ids: list[str]) -> None:
        current, self._current = self._current, None
        self._held = None
        if current is None:
            return
        current.session_ids = session_ids
        current.ended = self._close_reason or STOPPED
        current.seconds = round(trio.current_time() - current.heard.time, 2)
        self.conversations.append(current)
        log.info("conversation over (%s) after %.1f s; the service was ready %s after the wake",
                 current.ended, current.seconds,
                 "never" if current.ready_ms is None else f"{current.ready_ms:.0f} ms")
        self.console.status(self.waiting_status)
        if not session_ids:
            log.warning("the service could not be reached for this conversation")
        elif self.annotate is not None:
            values = {"wake_ready_ms": current.ready_ms, "conversation_s": current.seconds,
                      "conversation_end": current.ended}
            for session_id in session_ids:
                await self.annotate(session_id, values)


def wake_gate(gate: object) -> WakeGate | None:
    """The wake-word gate of a run, inside any policy wrapped around it (None: always)."""
    while not isinstance(gate, WakeGate):
        gate = getattr(gate, "inner", None)
        if gate is None:
            return None
    return gate
