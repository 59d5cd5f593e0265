"""Utterances from GPT-Live's transcript deltas, sans-IO: the faithful record without turns.

GPT-Live sends transcript fragments of both speakers with their place on the session
timeline (``start_ms`` / ``end_ms``) and never says that anything is done. Here they become
messages: one per *stretch* of one speaker, closed by

- a pause: that speaker's next fragment starts more than ``pause_ms`` after their last one
  ended, or the timeline (and the shell's clock, :meth:`Utterances.due`) moved that far on;
- a change of speaker: the other speaker's fragment starts at or after this stretch's end
  (speech that starts *over* it is overlap, not a change);
- the person talking over the robot (see below), or the end of the session.

A stretch is committed as it closes (one :class:`StoreMessage`); its text is the exact
concatenation of its fragments, in delivery order. Its ``seq`` is its start on the timeline
plus one, so messages sort by when they were said whatever order they closed in (overlapping
speech by start), and a late fragment of the person never lands after the robot's answer to it.

Interruptions: output audio carries no timestamps on a primary websocket, so a robot stretch's
audio is placed on the timeline from its first words (``start_ms``) for as long as the audio
received lasts. Person's speech starting inside that span is the person talking over the robot:
the model stops by itself (output ends), and the robot's stretch closes with a
:class:`BargeIn` so the shell stops the speaker at once; what the speaker had played comes back
through :meth:`Utterances.interrupted` as a :class:`StoreInterrupted`.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from r2d2voice.live.client_events import RATE
from r2d2voice.live.server_events import ASSISTANT, USER, TranscriptDelta
from r2d2voice.protocol.actions import (
    Action,
    AudioDone,
    BargeIn,
    StoreInterrupted,
    StoreMessage,
    UserSpeaking,
    UserStopped,
)

#: A speaker's silence this long (ms of the timeline) ends their utterance.
PAUSE_MS = 1000
#: Robot audio whose words never come is forgotten this long after it stopped (shell seconds).
WORDLESS_S = 10.0
#: Keep the raw delta events of a stretch (its evidence) up to this many, else none.
MAX_RAW_PARTS = 400
#: Robot stretches remembered for a late interruption report.
ROBOT_KEPT = 8


@dataclass
class Stretch:
    """One speaker talking without a pause: what becomes one message."""

    role: str
    item_id: str
    #: timeline ms of its first words; None: robot audio whose words have not come yet
    start_ms: int | None
    end_ms: int
    #: shell time of the last fragment or audio that arrived for it
    last_at: float
    #: where on the timeline its audio began, as far as known before its first words
    audio_from_ms: int = 0
    parts: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list, repr=False)
    audio_samples: int = 0
    #: the person talked over it (no more audio or words are added to it)
    cut: bool = False
    #: counted in :attr:`Utterances.replies_done` (a robot stretch that went quiet)
    done: bool = False
    #: its end was told: :class:`AudioDone` (the robot's), :class:`UserStopped` (the person's)
    told: bool = False

    @property
    def seq(self) -> int:
        return (self.start_ms if self.start_ms is not None else self.audio_from_ms) + 1

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def audio_span(self) -> tuple[int, int]:
        """Where its audio sits on the timeline, [start, end) in ms."""
        start = self.start_ms if self.start_ms is not None else self.audio_from_ms
        return start, start + self.audio_samples * 1000 // RATE


class Utterances:
    """The open stretches of both speakers and what was committed lately."""

    def __init__(self, pause_ms: int = PAUSE_MS) -> None:
        self.pause_ms = pause_ms
        self.open: dict[str, Stretch] = {}
        #: the latest timeline position any fragment reached
        self.timeline_ms = 0
        self.committed = 0
        #: stretches of the person begun (their first fragment came), and of the robot ended
        #: (silent for the pause on the clock, or closed): what a fast replay waits on
        self.heard = 0
        self.replies_done = 0
        self._robot: deque[Stretch] = deque(maxlen=ROBOT_KEPT)
        self._ids = itertools.count(1)

    # -- inputs ------------------------------------------------------------------------------
    def delta(self, ev: TranscriptDelta, now: float) -> list[Action]:
        """A transcript fragment arrived at shell time ``now``."""
        out: list[Action] = []
        self.timeline_ms = max(self.timeline_ms, ev.end_ms)
        other = self.open.get(ASSISTANT if ev.role == USER else USER)
        if other is not None and other.parts and ev.start_ms >= other.end_ms:
            out += self._close(other)  # the other speaker had stopped: a change of speaker
        stretch = self.open.get(ev.role)
        if stretch is not None and stretch.parts and ev.start_ms - stretch.end_ms > self.pause_ms:
            out += self._close(stretch)
            stretch = None
        if stretch is None:
            stretch = self._new(ev.role, ev.start_ms, ev.end_ms, now)
            if ev.role == USER:
                out.append(UserSpeaking(stretch.item_id))
        if stretch.start_ms is None:  # robot audio that came before its words
            stretch.start_ms = ev.start_ms
        stretch.parts.append(ev.delta)
        stretch.raw.append(ev.raw)
        stretch.end_ms = max(stretch.end_ms, ev.end_ms)
        stretch.last_at = now
        if ev.role == USER:
            out = self._talked_over(ev.start_ms, stretch.item_id) + out
        return out

    def audio(self, samples: int, now: float, timeline_ms: int) -> str:
        """Robot audio arrived (at ``timeline_ms`` as far as the shell's clock tells): the
        item id of the stretch it belongs to."""
        stretch = self.open.get(ASSISTANT)
        if stretch is None:
            stretch = self._new(ASSISTANT, None, timeline_ms, now)
            stretch.audio_from_ms = timeline_ms
        stretch.audio_samples += samples
        stretch.last_at = now
        return stretch.item_id

    def due(self, now: float, timeline_ms: int) -> list[Action]:
        """Close every stretch whose speaker has been silent for the pause, on the timeline
        (``timeline_ms``: the shell's estimate of where it is now) and on the shell's clock
        (fragments arrive late: both must agree)."""
        out: list[Action] = []
        for stretch in list(self.open.values()):
            quiet = now - stretch.last_at
            if stretch.parts and quiet * 1000 >= self.pause_ms:
                self._done(stretch)
                out += self._told(stretch)  # the robot went quiet: its audio is over
            if not stretch.parts:
                if quiet > WORDLESS_S:
                    del self.open[stretch.role]  # audio without words: nothing to store
                    out += self._told(stretch)
            elif (timeline_ms - stretch.end_ms > self.pause_ms
                  and quiet * 1000 >= self.pause_ms):
                out += self._close(stretch)
        return out

    def flush(self, *, partial: bool) -> list[Action]:
        """The session is over: commit whatever is open (``partial``: cut off by a lost
        connection)."""
        out: list[Action] = []
        for stretch in list(self.open.values()):
            out += self._close(stretch, partial=partial)
        return out

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker stopped robot stretch ``item_id`` after ``played_samples``."""
        stretch = next((s for s in self._robot if s.item_id == item_id), None)
        if stretch is None:
            return []
        stretch.cut = True
        out = self._close(stretch) if self.open.get(ASSISTANT) is stretch else []
        played = max(0, min(played_samples, stretch.audio_samples))
        return [*out, StoreInterrupted(item_id, stretch.seq, played * 1000 // RATE)]

    # -- queries -----------------------------------------------------------------------------
    def speaking(self, now: float, role: str | None = None) -> bool:
        """Someone (``role``, or anyone) said, or the robot sent audio, within the pause."""
        return any((now - s.last_at) * 1000 < self.pause_ms for s in self.open.values()
                   if role is None or s.role == role)

    @property
    def pending(self) -> bool:
        """Some stretch is still to be committed."""
        return any(s.parts for s in self.open.values())

    # -- helpers -----------------------------------------------------------------------------
    def _new(self, role: str, start_ms: int | None, end_ms: int, now: float) -> Stretch:
        prefix = "live_user" if role == USER else "live_r2"
        stretch = Stretch(role, f"{prefix}_{next(self._ids)}", start_ms, end_ms, now)
        self.open[role] = stretch
        if role == ASSISTANT:
            self._robot.append(stretch)
        else:
            self.heard += 1
        return stretch

    def _done(self, stretch: Stretch) -> None:
        if stretch.role == ASSISTANT and not stretch.done:
            stretch.done = True
            self.replies_done += 1

    def _talked_over(self, start_ms: int, user_item: str) -> list[Action]:
        """Person's speech starting at ``start_ms``: over the robot's audio, it cuts it."""
        robot = self._robot[-1] if self._robot else None
        if robot is None or robot.cut or not robot.audio_samples:
            return []
        begin, end = robot.audio_span
        if not begin <= start_ms < end:
            return []
        robot.cut = True
        closed = self._close(robot) if self.open.get(ASSISTANT) is robot else []
        return [BargeIn(user_item), *closed]

    def _told(self, stretch: Stretch) -> list[Action]:
        """The end of a stretch, once: the person stopped, or the robot's audio is over."""
        if stretch.told or (stretch.role == ASSISTANT and not stretch.audio_samples):
            return []
        stretch.told = True
        return [UserStopped(stretch.item_id) if stretch.role == USER
                else AudioDone(stretch.item_id)]

    def _close(self, stretch: Stretch, *, partial: bool = False) -> list[Action]:
        if self.open.get(stretch.role) is stretch:
            del self.open[stretch.role]
        told = self._told(stretch)
        if not stretch.parts:
            return told
        self._done(stretch)
        text = stretch.text
        raw = None
        if len(stretch.raw) <= MAX_RAW_PARTS and all(stretch.raw):
            raw = "[" + ",".join(stretch.raw) + "]"
        stretch.raw = []
        self.committed += 1
        return [*told, StoreMessage(stretch.role, stretch.item_id, stretch.seq, text, raw=raw,
                                    partial=partial)]
