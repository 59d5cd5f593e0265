"""The speaker's level: the RMS of what it is handed, one figure per 50 ms window (the
``level`` event, so that a dome light moves with the voice).

:class:`LevelMeter` is fed on the consumer's thread (the PortAudio callback, or a WAV sink) with
the samples the playout buffer hands out, after the volume: what reaches the speaker. It
allocates nothing per call and does a dot product per block; while nobody wants the level
(``wanted()`` is false) it does nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from r2d2voice.audio.pcm import RATE

#: one level per this many samples handed out (50 ms: 20 a second while audio plays)
LEVEL_WINDOW = RATE // 20
_FULL_SCALE = 32768.0


class LevelMeter:
    """Calls ``on_level(rms)`` (0..1, 4 decimals) for each :data:`LEVEL_WINDOW` samples fed,
    across calls; a window is only counted while ``wanted()``. Not thread-safe: one
    consumer feeds it."""

    def __init__(self, on_level: Callable[[float], None],
                 wanted: Callable[[], bool] = lambda: True, *,
                 window: int = LEVEL_WINDOW) -> None:
        self.on_level = on_level
        self.wanted = wanted
        self.window = window
        self._scratch = np.zeros(window, dtype=np.float32)
        self._squares = 0.0
        self._count = 0

    def feed(self, pcm: np.ndarray) -> None:
        """``pcm`` (int16) was handed to the speaker."""
        if not self.wanted():
            self._squares, self._count = 0.0, 0
            return
        at, n = 0, len(pcm)
        while at < n:
            take = min(self.window - self._count, n - at)
            part = self._scratch[:take]
            part[:] = pcm[at:at + take]  # int16 -> float32 in place: no allocation
            self._squares += float(np.dot(part, part))
            self._count += take
            at += take
            if self._count == self.window:
                rms = (self._squares / self.window) ** 0.5 / _FULL_SCALE
                self._squares, self._count = 0.0, 0
                self.on_level(round(min(1.0, rms), 4))
