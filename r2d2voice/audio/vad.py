"""Energy voice-activity detection, sans-IO (numpy only).

:class:`EnergyVad` turns a stream of PCM16 chunks into :class:`SpeechStarted` /
:class:`SpeechStopped` events, with the parameters of the Realtime API's ``server_vad``
turn detection (``threshold``, ``prefix_padding_ms``, ``silence_duration_ms``).
:func:`find_turns` runs it over a whole recording and reports where each turn starts,
ends and where a server VAD with the same parameters would close it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EnergyVad",
    "SpeechStarted",
    "SpeechStopped",
    "Turn",
    "find_turns",
    "threshold_to_dbfs",
]

WINDOW_MS = 10
"""Analysis window length."""

START_MS = 60
"""Speech must stay above the threshold this long before it counts as an onset (clicks don't)."""

RESUME_MS = 20
"""During a pause, sound must stay above the threshold this long to count as speech again."""

_FLOOR_DBFS = -70.0
_SPAN_DB = 60.0


def threshold_to_dbfs(threshold: float) -> float:
    """Map the Realtime API's 0..1 VAD ``threshold`` to a window RMS level in dBFS.

    Linear in dB: ``dbfs = -70 + 60 * threshold``, so 0.0 -> -70 dBFS (trips on almost
    anything), 0.5 -> -40 dBFS (the default: normal speech at -35..-10 dBFS RMS trips it,
    a quiet room or microphone hiss at -60..-50 dBFS does not), 1.0 -> -10 dBFS (only very
    loud, close speech).
    """
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ValueError(f"VAD threshold must be between 0.0 and 1.0, got {threshold!r}")
    return _FLOOR_DBFS + _SPAN_DB * threshold


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began.

    ``audio_start_ms`` is the onset minus the prefix padding (never below 0) — the start of
    the audio a server would commit; ``onset_ms`` is where the sound actually crossed the
    threshold. Both are measured from the start of the fed stream.
    """

    audio_start_ms: int
    onset_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    """Speech ended: ``audio_end_ms`` is where the final silence began (from stream start)."""

    audio_end_ms: int


VadEvent = SpeechStarted | SpeechStopped


@dataclass(frozen=True)
class Turn:
    """One turn found in a recording, in samples from the start of the recording.

    ``start_sample`` is the speech onset (prefix padding not applied), ``end_sample`` where
    the final silence begins, ``close_sample`` where a server VAD with the same parameters
    would close the turn (``end_sample`` + ``silence_duration_ms``, on the analysis grid).
    """

    start_sample: int
    end_sample: int
    close_sample: int


class EnergyVad:
    """Window-RMS voice-activity detector with the knobs of ``server_vad``.

    Feed int16 mono PCM of any chunk size; it is analysed in 10 ms windows (RMS in dBFS
    against :func:`threshold_to_dbfs` of ``threshold``). Speech starts after 60 ms above the
    threshold; it stops once ``silence_duration_ms`` has passed below it (isolated 10 ms
    blips during the pause don't reset the pause). Incomplete windows are kept for the next
    :meth:`feed`.
    """

    def __init__(
        self,
        rate: int = 24000,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 500,
    ) -> None:
        if rate <= 0 or rate % (1000 // WINDOW_MS):
            raise ValueError(f"sample rate must be a positive multiple of 100 Hz, got {rate!r}")
        if prefix_padding_ms < 0:
            raise ValueError(f"prefix_padding_ms must be >= 0, got {prefix_padding_ms!r}")
        if silence_duration_ms < 0:
            raise ValueError(f"silence_duration_ms must be >= 0, got {silence_duration_ms!r}")
        self.rate = rate
        self.threshold = threshold
        self.threshold_dbfs = threshold_to_dbfs(threshold)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self._window = rate * WINDOW_MS // 1000
        # Mean square of a window at the threshold, on int16 scale: compare without logs.
        self._min_mean_square = (32768.0 * 10 ** (self.threshold_dbfs / 20)) ** 2
        self._start_windows = START_MS // WINDOW_MS
        self._resume_windows = RESUME_MS // WINDOW_MS
        self._silence_windows = math.ceil(silence_duration_ms / WINDOW_MS)
        self.reset()

    def reset(self) -> None:
        """Forget everything: state, pending samples and the stream clock (back to 0 ms)."""
        self._pending = np.zeros(0, dtype=np.int16)
        self._windows_done = 0  # analysed windows since the stream start
        self._speaking = False
        self._loud_run = 0  # consecutive loud windows
        self._onset_window = 0
        self._silence_start: int | None = None  # window index where the current pause began

    @property
    def speaking(self) -> bool:
        """True between a :class:`SpeechStarted` and the following :class:`SpeechStopped`."""
        return self._speaking

    @property
    def samples_analysed(self) -> int:
        """Samples consumed into complete windows since the stream start."""
        return self._windows_done * self._window

    def feed(self, pcm: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Analyse more audio; return the events it completes, in order."""
        return [self._to_event(kind, window) for kind, window in self._feed_windows(pcm)]

    # -- internals ---------------------------------------------------------------------

    def _ms(self, window: int) -> int:
        return window * WINDOW_MS

    def _to_event(self, kind: str, window: int) -> SpeechStarted | SpeechStopped:
        if kind == "start":
            onset = self._ms(window)
            return SpeechStarted(max(0, onset - self.prefix_padding_ms), onset)
        return SpeechStopped(self._ms(window))

    def _feed_windows(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        """Core: ("start", onset window) / ("stop", silence-start window) pairs."""
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16:
            raise TypeError(f"EnergyVad expects int16 PCM, got {pcm.dtype}")
        if pcm.ndim != 1:
            raise ValueError(f"EnergyVad expects mono (1-D) PCM, got shape {pcm.shape}")
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = data.size // self._window
        self._pending = data[n * self._window :].copy()
        if n == 0:
            return []
        frames = data[: n * self._window].astype(np.float64).reshape(n, self._window)
        loud = (frames * frames).mean(axis=1) >= self._min_mean_square
        events: list[tuple[str, int]] = []
        for is_loud in loud.tolist():
            index = self._windows_done
            self._windows_done += 1
            if is_loud:
                self._loud_run += 1
            else:
                self._loud_run = 0
            if not self._speaking:
                if self._loud_run >= self._start_windows:
                    self._speaking = True
                    self._onset_window = index - self._loud_run + 1
                    self._silence_start = None
                    events.append(("start", self._onset_window))
                continue
            if self._loud_run >= self._resume_windows:
                self._silence_start = None
            elif self._silence_start is None:
                if is_loud:
                    continue  # a blip right at the end of speech: still speaking
                self._silence_start = index
            if self._silence_start is not None and (
                self._windows_done - self._silence_start >= self._silence_windows
            ):
                events.append(("stop", self._silence_start))
                self._speaking = False
                self._silence_start = None
                self._loud_run = 0
        return events


def find_turns(pcm: np.ndarray, rate: int = 24000, **vad_params: float) -> list[Turn]:
    """Every turn an :class:`EnergyVad` with ``vad_params`` finds in a whole recording.

    A turn still open when the audio ends is reported as if silence followed: it ends where
    the trailing pause began (or at the last sample) and closes ``silence_duration_ms``
    after that, beyond the end of ``pcm``.
    """
    vad = EnergyVad(rate=rate, **vad_params)  # type: ignore[arg-type]
    window = vad._window
    turns: list[Turn] = []
    onset: int | None = None
    for kind, index in vad._feed_windows(pcm):
        if kind == "start":
            onset = index * window
        else:
            assert onset is not None
            # The stop is decided at the end of the window that completes the pause.
            close = (index + vad._silence_windows) * window
            turns.append(Turn(onset, index * window, close))
            onset = None
    if onset is not None:
        pause = vad._silence_start
        end = pause * window if pause is not None else len(pcm)
        close = end + vad._silence_windows * window
        turns.append(Turn(onset, end, close))
    return turns
