"""The input audio buffer and the turns an energy VAD finds in it (sans-IO, no protocol ids).

Times are milliseconds from the start of the session's input stream. Buffer policy: at most
:data:`MAX_BUFFER_BYTES` (the service's 15 MiB, ~5.5 min); beyond it the oldest audio is dropped
and counted. Outside a turn only what the prefix padding may still need is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from r2d2voice.audio.vad import EnergyVad, SpeechStarted
from r2d2voice.localbackend.wire import RATE, ms

__all__ = ["MAX_BUFFER_BYTES", "InputAudio", "TurnEnded", "TurnStarted"]

MAX_BUFFER_BYTES = 15 * 2**20
"""Input audio buffer cap, as the service's 15 MiB (~5.5 min): the oldest audio is dropped."""

_KEEP_EXTRA_MS = 500
"""Outside a turn, keep this much audio beyond the prefix padding."""


@dataclass(frozen=True)
class TurnStarted:
    """Speech began; the turn's audio starts at ``audio_start_ms`` (onset minus padding)."""

    audio_start_ms: int


@dataclass(frozen=True)
class TurnEnded:
    """Speech ended at ``audio_end_ms``: ``audio`` is the turn (padding included),
    ``speech_ms`` the time from the onset to the end."""

    audio_end_ms: int
    audio: bytes
    speech_ms: int


class InputAudio:
    """Audio appended by the client, not yet committed, and the VAD that cuts it into turns.

    ``vad`` is :class:`EnergyVad` keyword arguments, or None for manual turns only.
    ``commit_all``: a turn's end empties the buffer, as the service's VAD commit does
    (otherwise the audio after the speech stays, for the next turn's padding).
    """

    def __init__(self, vad: dict[str, Any] | None, commit_all: bool = False) -> None:
        self.commit_all = commit_all
        self._total = 0  # samples appended since the session started
        self._buffer = bytearray()  # input audio not yet committed
        self._start = 0  # stream sample index of _buffer[0]
        self.dropped_samples = 0  # by the cap, since the session started
        self.detect(vad)

    @property
    def samples(self) -> int:
        """Samples held (what a manual commit would take)."""
        return len(self._buffer) // 2

    @property
    def position(self) -> int:
        """Samples appended since the session started (the input stream's clock)."""
        return self._total

    @property
    def in_turn(self) -> bool:
        return self._speech is not None

    def detect(self, vad: dict[str, Any] | None) -> None:
        """Restart turn detection with new parameters (None: off); a turn in progress is
        forgotten and the VAD's clock starts now."""
        self._vad = EnergyVad(RATE, **vad) if vad is not None else None
        self._vad_base = self._total  # stream sample index where the VAD's clock starts
        self._speech: SpeechStarted | None = None

    def append(self, raw: bytes) -> list[TurnStarted | TurnEnded]:
        """Buffer PCM16 ``raw``; return the turn boundaries it completes, in order."""
        self._buffer += raw
        self._total += len(raw) // 2
        if len(self._buffer) > MAX_BUFFER_BYTES:
            excess = (len(self._buffer) - MAX_BUFFER_BYTES) // 2
            self._drop_before(self._start + excess)
            self.dropped_samples += excess
        if self._vad is None:
            return []
        out: list[TurnStarted | TurnEnded] = []
        base_ms = ms(self._vad_base)
        for ev in self._vad.feed(np.frombuffer(raw, dtype="<i2")):
            if isinstance(ev, SpeechStarted):
                self._speech = ev
                out.append(TurnStarted(base_ms + ev.audio_start_ms))
                continue
            start, self._speech = self._speech, None
            assert start is not None
            first = self._vad_base + start.audio_start_ms * RATE // 1000
            end = self._vad_base + ev.audio_end_ms * RATE // 1000
            audio = self._slice(first, end)
            self._drop_before(self._total if self.commit_all else end)
            speech_ms = ev.audio_end_ms - start.onset_ms
            out.append(TurnEnded(base_ms + ev.audio_end_ms, audio, speech_ms))
        if self._speech is None:
            keep = (self._vad.prefix_padding_ms + _KEEP_EXTRA_MS) * RATE // 1000
            self._drop_before(self._total - keep)
        return out

    def take(self) -> bytes:
        """Everything buffered (a manual commit or a clear); turn detection restarts."""
        audio = bytes(self._buffer)
        self._drop_before(self._total)
        if self._vad is not None:
            self._vad.reset()
        self._vad_base = self._total
        self._speech = None
        return audio

    def _slice(self, start: int, end: int) -> bytes:
        """Buffered audio between two stream sample indexes (clipped to what is held)."""
        lo = max(start - self._start, 0)
        hi = max(min(end - self._start, self.samples), lo)
        return bytes(self._buffer[2 * lo : 2 * hi])

    def _drop_before(self, sample: int) -> None:
        n = min(max(sample - self._start, 0), self.samples)
        del self._buffer[: 2 * n]
        self._start += n
