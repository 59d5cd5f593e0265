"""Turn latency, sans-IO: end of the user's speech → first reply audio received → first reply
sample played. Every time is the shell's monotonic ``now``; a latency is a difference."""

from __future__ import annotations

from collections import OrderedDict

from r2d2voice.protocol.actions import Action, StoreLatency
from r2d2voice.realtime.tracking import remember


class Latencies:
    """What one session needs to tell how long each reply took."""

    def __init__(self) -> None:
        #: reply item -> (response id, end of the user's speech) until its first sample plays
        self.awaiting_play: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._created: OrderedDict[str, float] = OrderedDict()
        self._first_audio: OrderedDict[str, float] = OrderedDict()
        self._stopped: float | None = None

    def speech_stopped(self, now: float) -> None:
        self._stopped = now

    def no_speech(self) -> None:
        """The next response answers no speech (the idle-timeout nudge): no latency."""
        self._stopped = None

    def response_created(self, response_id: str, now: float) -> None:
        remember(self._created, response_id, now)

    def audio(self, response_id: str, item_id: str, now: float) -> None:
        """Reply audio of ``response_id`` arrived at ``now``."""
        if response_id in self._first_audio:
            return
        remember(self._first_audio, response_id, now)
        stopped = self._answered_speech(response_id)
        if stopped is not None:
            remember(self.awaiting_play, item_id, (response_id, stopped))

    def response_done(self, response_id: str) -> float | None:
        """End of speech → first audio received of ``response_id`` in ms (None: no speech turn
        or no audio)."""
        first = self._first_audio.pop(response_id, None)
        stopped = self._answered_speech(response_id)
        self._created.pop(response_id, None)
        if first is None or stopped is None:
            return None
        return round((first - stopped) * 1000, 1)

    def first_played(self, item_id: str, at: float) -> list[Action]:
        """The first sample of reply ``item_id`` reached the speaker at ``at`` (same clock)."""
        pending = self.awaiting_play.pop(item_id, None)
        if pending is None:
            return []
        response_id, stopped = pending
        return [StoreLatency(response_id, round((at - stopped) * 1000, 1))]

    def never_played(self, item_id: str) -> None:
        self.awaiting_play.pop(item_id, None)

    def _answered_speech(self, response_id: str) -> float | None:
        """When the user's speech this response answers stopped (None: not a speech turn)."""
        stopped = self._stopped
        created = self._created.get(response_id)
        if stopped is None or created is None or stopped > created:
            return None
        return stopped
