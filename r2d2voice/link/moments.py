"""What the link tells the run's event stream (``system/events.py``): the turn's moments as
they happen, and what the speaker did with each reply.

The turn's moments come from the protocol core's actions (:class:`~.effects.Effects` hands them
here): ``user_speaking`` (a barge-in), ``user_stopped``, ``thinking`` (a response began and
nothing of the robot plays), ``transcript``, ``error``; ``listening`` when the session is
configured and whenever the robot is done answering (nothing open, nothing left to play).

The speaker's come from the playout buffer, which wakes the link's watch when an item's first
sample is handed out and when it drains: ``speaking {item_id}`` at a reply's first sample,
``level {rms}`` about 20 times a second while audio is handed out (:meth:`Moments.follow_level`),
``spoken {item_id, interrupted, played_ms}`` once no more of it comes (:class:`AudioDone`, a
barge-in, the connection's end) and none of it is left to play. A reply that never reached the
speaker (cut before it played, or the speaker missing) is neither. ``interrupted``: the
listener did not hear all that came of it.

:meth:`Moments.follow` keeps watching for as long as the speaker plays, past the link's last
connection (the last reply may still be playing when it closes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from r2d2voice.audio.level import LevelMeter
from r2d2voice.audio.pcm import RATE
from r2d2voice.system.events import LEVEL, Events

if TYPE_CHECKING:
    from r2d2voice.audio.playout import PlayoutBuffer
    from r2d2voice.link.state import LinkState
    from r2d2voice.protocol.core import ProtocolCore

#: replies followed at once (bounded for weeks-long runs; the oldest is forgotten)
MAX_FOLLOWED = 64


@dataclass
class _Reply:
    session_id: str | None  # the session it came in
    sent: int = 0  # samples handed to the speaker's channel
    started: bool = False  # ``speaking`` said
    over: bool = False  # no more audio comes
    cut: bool = False  # stopped by a barge-in


@dataclass(eq=False)
class Moments:
    """The link's side of the event stream (see the module docstring). ``events`` is the run's
    hub (a silent one by default)."""

    events: Events = field(default_factory=Events)
    #: the last turn moment said (``spoken`` counts: the robot was done with a reply)
    last: str = ""
    _replies: OrderedDict[str, _Reply] = field(default_factory=OrderedDict)

    def emit(self, name: str, /, **fields: object) -> None:
        self.events.emit(name, **fields)

    def session(self, session_id: str | None) -> None:
        """The moments from now on belong to service session ``session_id``."""
        self.events.set_session(session_id)

    # -- the turn ----------------------------------------------------------------------------
    def _turn(self, name: str) -> None:
        if name != self.last:  # the same state again says nothing new
            self.last = name
            self.emit(name)

    def conversation_started(self) -> None:
        self.last = ""  # the gate may have said something meanwhile (waiting_for_wake)
        self.emit("conversation_started")

    def conversation_ended(self, reason: str) -> None:
        self.last = ""
        self.emit("conversation_ended", reason=reason)
        self.session(None)

    def configured(self) -> None:
        """The service accepted the session: it hears the person now."""
        self._turn("listening")

    def user_speaking(self) -> None:
        self._turn("user_speaking")

    def user_stopped(self) -> None:
        self._turn("user_stopped")

    def response_started(self) -> None:
        """A reply is being made: ``thinking``, unless the robot still plays (then it is said
        once that is spoken, if the reply still has not begun)."""
        if not self._sounding():
            self._turn("thinking")

    # -- the speaker -------------------------------------------------------------------------
    def queued(self, item_id: str, samples: int) -> None:
        """``samples`` of reply ``item_id`` went to the speaker's channel."""
        reply = self._replies.get(item_id)
        if reply is None:
            reply = self._replies[item_id] = _Reply(self.events.session_id)
            if len(self._replies) > MAX_FOLLOWED:
                self._replies.popitem(last=False)
        reply.sent += samples

    def audio_done(self, item_id: str) -> None:
        reply = self._replies.get(item_id)
        if reply is not None:
            reply.over = True

    def cut(self, item_id: str) -> None:
        """A barge-in stopped ``item_id`` on the speaker."""
        reply = self._replies.get(item_id)
        if reply is not None:
            reply.over = reply.cut = True

    def connection_over(self) -> None:
        """The connection is gone: none of its replies gets more audio."""
        for reply in self._replies.values():
            reply.over = True

    def check(self, buffer: PlayoutBuffer, core: ProtocolCore | None) -> None:
        """Say what the speaker did since the last look (``speaking``, ``spoken``), and
        ``listening`` / ``thinking`` once the robot has stopped speaking."""
        self._started(buffer)
        spoke = False
        for item_id, reply in list(self._replies.items()):
            # over, all of it in the buffer's hands (it counts what it received, even what it
            # dropped), and none of it queued: the speaker is done with it
            if (reply.over and buffer.received_samples(item_id) >= reply.sent
                    and not buffer.holds(item_id)):
                del self._replies[item_id]
                if reply.started:
                    played = buffer.played_samples(item_id)
                    self.events.emit_for(
                        reply.session_id, "spoken", item_id=item_id,
                        interrupted=reply.cut or played < buffer.received_samples(item_id),
                        played_ms=round(played * 1000 / RATE))
                    spoke = True
        if spoke:
            self.last = "spoken"
        if self.last not in ("spoken", "thinking") or core is None:
            return
        if not self._replies and core.idle and buffer.queued_samples() == 0:
            self._turn("listening")  # the robot is done answering
        elif spoke and not self._replies and not core.user_speaking:
            self._turn("thinking")  # a reply (or a tool) is still being made

    def _started(self, buffer: PlayoutBuffer) -> None:
        """``speaking`` for each reply whose first sample is out by now."""
        for item_id, reply in self._replies.items():
            if not reply.started and buffer.first_played_at(item_id) is not None:
                reply.started = True
                self.last = "speaking"
                self.events.emit_for(reply.session_id, "speaking", item_id=item_id)

    def follow_level(self, buffer: PlayoutBuffer) -> Callable[[], None]:
        """``level`` events of what ``buffer`` hands the speaker, measured only while someone
        follows them (from the run's thread: a reply's ``speaking`` always comes before its
        first level); returns what stops it."""
        token = trio.lowlevel.current_trio_token()
        run_thread = threading.get_ident()

        def level(rms: float) -> None:
            self._started(buffer)
            self.emit(LEVEL, rms=rms)

        def measured(rms: float) -> None:  # on the speaker's thread
            if threading.get_ident() == run_thread:
                level(rms)
            else:
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(level, rms)

        meter = LevelMeter(measured, lambda: self.events.wants(LEVEL))
        buffer.set_tap(meter.feed)
        return lambda: buffer.set_tap(None)

    def _sounding(self) -> bool:
        """A reply plays (or waits to, its first sample not yet out)."""
        return bool(self._replies)

    async def follow(self, state: LinkState) -> None:
        """Look whenever the link's state changes (the playout buffer's starts and drains
        included), until cancelled; the run cancels it once the speaker is done, then calls
        :meth:`finish`."""
        while True:
            self.check(state.buffer, state.conversation)
            await state.watch.next_change()

    def finish(self, state: LinkState) -> None:
        """The speaker has played out (the run is over): what sounded is spoken."""
        self.connection_over()
        self.check(state.buffer, state.conversation)

