"""The echo canceller stage: WebRTC's AEC3 (``livekit.rtc.AudioProcessingModule``) between the
microphone and the service, fed with what actually reached the speaker.

Two halves, one per audio thread:

- :class:`SpeakerTap` sits in the playback callback (PortAudio's output thread), after the
  playout buffer, the volume gain and the earcons: it applies the double-talk duck to the
  block, then copies it (channel 0, device rate) into a ring and notes, from PortAudio's
  ``outputBufferDacTime``, when the block's first sample reaches the DAC. No lock, no wait.
- :class:`EchoCanceller` runs on the trio thread where capture turns the microphone's
  blocks into 24 kHz frames (``audio/capture.py``), before they are handed on. Per 10 ms of
  microphone audio (stamped with its ADC time from ``inputBufferAdcTime``) it takes the 10 ms
  of speaker audio whose DAC time is ``LEAD_MS`` later (so the echo always comes after its
  reference, whatever small error the timing has), gives it to ``process_reverse_stream`` at
  the speaker's own rate (the module resamples), and the microphone's to ``process_stream``.
  AEC3's delay estimator finds the rest of the acoustic delay.

Times are mapped to one clock (``time.monotonic``) per stream by :class:`StreamClock`:
``now + (dac - currentTime)`` on the output, ``now - (currentTime - adc)`` on the input, so
the two streams' own clocks never need to agree. Where PortAudio reports no timing (zeros), the
stream's latency stands in.

**Rest**: once nothing but silence has reached the speaker for ``REST_AFTER_S`` (the
reverberant tail is long over), microphone audio passes untouched and the module is not called:
idle listening costs what it did before. **Reset**: a new microphone stream or a speaker that
was reopened after going away gives a fresh module (another device, another echo path).
**Double talk**: :class:`~r2d2voice.audio.doubletalk.DoubleTalk` watches the output and ducks
the playback when someone speaks over the robot.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from r2d2voice.audio.doubletalk import DoubleTalk
from r2d2voice.audio.pcm import RATE, rms_dbfs

log = logging.getLogger(__name__)

__all__ = ["MODES", "EchoCanceller", "EchoStage", "EchoStatistics", "PaClock", "SpeakerTap",
           "StreamClock", "echo_stage", "load_apm", "resolve_mode"]

#: Microphone audio passes untouched once the speaker has been silent this long.
REST_AFTER_S = 1.0
#: The reference is taken this much later than the microphone chunk (timing errors, causality).
LEAD_MS = 10
#: Speaker audio kept for the canceller (it reads ~LEAD_MS ahead of the mic's ADC time).
RING_SECONDS = 2.0
#: A timing estimate this far from the smoothed one is a real jump (an underrun): follow it.
SNAP_SECONDS = 0.005
CHUNK = RATE // 100  # 10 ms at 24 kHz
#: tuning aid: R2D2_ECHO_TRACE=DIR logs every chunk taken for someone speaking and writes what
#: the canceller saw (mic.raw, ref.raw at the speaker's rate, out.raw; int16) into DIR
TRACE = os.environ.get("R2D2_ECHO_TRACE") or None
#: A reference is tonal when its TONAL_PEAKS strongest bins (of its recent spectrum) hold
#: TONAL_SHARE of its energy; an output chunk is its echo when that share of it lies within
#: TONAL_HZ of those bins.
TONAL_MS = 40
TONAL_NFFT = 4096
TONAL_PEAKS = 24
#: the held spectrum decays like the room's tail (-2 dB per 10 ms)
TONAL_DECAY = 10 ** (-2 / 10)
TONAL_SHARE = 0.6
TONAL_HZ = 80.0


def load_apm() -> Callable[[], Any] | None:
    """A factory of WebRTC audio processing modules (AEC3 + high-pass), or None when the
    ``livekit`` package is missing or does not load on this machine."""
    try:
        from livekit import rtc
    except Exception as exc:  # ImportError, or its native library failing to load
        log.debug("livekit unavailable: %s", exc)
        return None

    def make() -> Any:
        return rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)

    return make


class StreamClock:
    """Sample index of one stream <-> monotonic time, smoothed over PortAudio's per-block
    timing (jitter of a fraction of a millisecond) and snapping to real jumps."""

    def __init__(self) -> None:
        self.rate = 0
        self.offset: float | None = None  # monotonic time of sample 0

    def start(self, rate: int) -> None:
        self.rate, self.offset = rate, None

    def update(self, index: int, t: float) -> None:
        est = t - index / self.rate
        if self.offset is None or abs(est - self.offset) > SNAP_SECONDS:
            self.offset = est
        else:
            self.offset += 0.05 * (est - self.offset)

    def time_of(self, index: float) -> float | None:
        return None if self.offset is None else self.offset + index / self.rate

    def index_at(self, t: float) -> float | None:
        return None if self.offset is None else (t - self.offset) * self.rate


class PaClock:
    """PortAudio's stream clock -> the monotonic clock, for one stream's callback.

    ``now - currentTime`` is the offset between the two clocks plus however long the callback
    waited after PortAudio took ``currentTime`` (for the GIL: milliseconds, on a busy board).
    The smallest offset seen is the true one; it is allowed to creep up by ``CREEP`` per call
    (the clocks drift apart slowly) and jumps when the stream clock itself jumps (a wall clock
    stepped by NTP: ALSA stamps with it).
    """

    CREEP = 1e-6
    JUMP = 0.1

    def __init__(self) -> None:
        self.offset: float | None = None

    def to_monotonic(self, info: Any, now: float, field: str, fallback: float) -> float:
        """Monotonic time of a block's first sample from PortAudio's ``time`` struct
        (``field``: ``outputBufferDacTime``, ``inputBufferAdcTime``), or ``now + fallback``
        where PortAudio reports zeros."""
        current = getattr(info, "currentTime", 0.0)
        at = getattr(info, field, 0.0)
        if not (current and at):
            return now + fallback
        seen = now - current
        if self.offset is None or seen < self.offset or seen - self.offset > self.JUMP:
            self.offset = seen
        else:
            self.offset += self.CREEP
        return at + self.offset


class SpeakerTap:
    """What reaches the speaker, for the canceller; filled by the output callback.

    ``duck`` (trio side) is the gain the double-talk detector wants on the playback; the
    callback ramps towards it over one block, before the copy, so the reference is the ducked
    audio. ``generation`` changes when the speaker device was (re)opened after being away.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate = 0
        self.ring = np.zeros(0, dtype=np.int16)
        self.written = 0
        self.timeline = StreamClock()
        self.segment = 0  # bumped for each output stream
        self.generation = 0
        self.playing = False
        self.last_sound = -math.inf  # monotonic time the last non-silent sample left the DAC
        self.duck = 1.0
        self._gain = 1.0
        self._latency = 0.0
        self._pa = PaClock()

    def device_opened(self) -> None:
        """The speaker device was (re)opened: the echo path may be another (trio thread)."""
        self.generation += 1

    def start(self, rate: int, latency: float) -> None:
        """An output stream at ``rate`` is about to start (trio thread; no callback runs)."""
        if rate != self.rate or not len(self.ring):
            self.ring = np.zeros(round(rate * RING_SECONDS), dtype=np.int16)
        self.rate, self._latency = rate, latency
        self.written = 0
        self.timeline.start(rate)
        self._pa = PaClock()
        self._gain = self.duck
        self.segment += 1
        self.playing = True

    def stop(self) -> None:
        """The output stream was closed: from now on the speaker plays nothing."""
        self.playing = False

    def render(self, outdata: np.ndarray, time_info: Any) -> None:
        """PortAudio output thread, after ``outdata`` (int16, frames x channels) is filled:
        duck it, copy it, stamp it. Bounded work, no lock."""
        n = len(outdata)
        if not n or not len(self.ring):
            return
        target = self.duck
        if target != 1.0 or self._gain != 1.0:
            ramp = np.linspace(self._gain, target, n, endpoint=False, dtype=np.float32)
            np.copyto(outdata, (outdata * ramp[:, np.newaxis]).astype(np.int16))
            self._gain = target
        now = self.clock()
        dac = self._pa.to_monotonic(time_info, now, "outputBufferDacTime", self._latency)
        w, cap = self.written, len(self.ring)
        start = w % cap
        first = min(n, cap - start)
        self.ring[start:start + first] = outdata[:first, 0]
        if first < n:
            self.ring[:n - first] = outdata[first:, 0]
        self.timeline.update(w, dac)
        if outdata[:, 0].any():
            self.last_sound = dac + n / self.rate
        self.written = w + n  # after the copy: the reader reads up to here

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        """Device samples [start, start + n) of the current stream into ``out``; zeros for
        what is not (or no longer) in the ring."""
        out[:] = 0
        w, cap = self.written, len(self.ring)
        lo, hi = max(start, w - cap, 0), min(start + n, w)
        if hi <= lo:
            return
        a, b = lo % cap, (lo % cap) + (hi - lo)
        if b <= cap:
            out[lo - start:hi - start] = self.ring[a:b]
        else:
            split = cap - a
            out[lo - start:lo - start + split] = self.ring[a:]
            out[lo - start + split:hi - start] = self.ring[:b - cap]


@dataclass
class EchoStatistics:
    """``chunks``: 10 ms chunks through the module; ``resets``: fresh modules (device
    reopened); ``resyncs``: the reference position jumped (the speaker's timeline moved);
    ``rests``: times the canceller went to rest; ``errors``: chunks the module refused (passed
    through)."""

    chunks: int = 0
    resets: int = 0
    resyncs: int = 0
    rests: int = 0
    errors: int = 0


class EchoCanceller:
    """The capture half: 24 kHz microphone audio in, the same with the echo removed out.

    ``make_apm`` builds a module (see :func:`load_apm`); ``tap`` is the speaker's
    :class:`SpeakerTap`. Call :meth:`reset` for a new microphone stream, then :meth:`process`
    with each block and the ADC time of its first sample (trio thread only).
    """

    def __init__(self, make_apm: Callable[[], Any], tap: SpeakerTap,
                 doubletalk: DoubleTalk | None = None) -> None:
        from livekit.rtc import AudioFrame

        self._frame = AudioFrame
        self.make_apm = make_apm
        self.tap = tap
        self.doubletalk = doubletalk if doubletalk is not None else DoubleTalk()
        self.stats = EchoStatistics()
        self.apm: Any = None
        self.active = False
        self._pending = np.zeros(0, dtype=np.int16)
        self._pending_time = 0.0
        self._generation = -1
        self._segment = -1
        self._ref_pos: int | None = None
        self._ref = np.zeros(0, dtype=np.int16)
        self._held = np.zeros(0)
        self._held_rate = 0
        self._ref_history = np.zeros(0)
        self._out_history = np.zeros(RATE * TONAL_MS // 1000)

    def reset(self) -> None:
        """A new microphone stream (or speaker device): a fresh module, nothing pending."""
        if self.apm is not None:
            self.stats.resets += 1
        self.apm = None
        self.active = False
        self._pending = np.zeros(0, dtype=np.int16)
        self._ref_pos = None
        self.doubletalk.forget()
        self.tap.duck = 1.0

    def process(self, pcm: np.ndarray, adc_time: float) -> np.ndarray:
        """``pcm`` (int16, 24 kHz) captured from ``adc_time`` on, with the echo removed; up to
        10 ms of it may be held back for the next call while the canceller works."""
        if not self._wanted(adc_time + len(pcm) / RATE):
            if self.active:
                self._go_to_rest()
                out = np.concatenate((self._pending, pcm)) if len(self._pending) else pcm
                self._pending = np.zeros(0, dtype=np.int16)
                return out
            if len(pcm):
                self.doubletalk.quiet(rms_dbfs(pcm), adc_time)
            return pcm
        if not self.active:
            self._wake()
            self._pending, self._pending_time = np.zeros(0, dtype=np.int16), adc_time
        data = np.concatenate((self._pending, pcm)) if len(self._pending) else pcm
        start = self._pending_time if len(self._pending) else adc_time
        whole = len(data) // CHUNK * CHUNK
        out = np.empty(whole, dtype=np.int16)
        for i in range(0, whole, CHUNK):
            out[i:i + CHUNK] = self._chunk(data[i:i + CHUNK], start + i / RATE)
        self._pending = data[whole:].copy()
        self._pending_time = start + whole / RATE
        return out

    # -- internals ------------------------------------------------------------------------------

    def _wanted(self, now: float) -> bool:
        tap = self.tap
        return tap.playing or now - tap.last_sound < REST_AFTER_S

    def _wake(self) -> None:
        self.active = True
        if self.apm is None or self._generation != self.tap.generation:
            if self.apm is not None:
                self.stats.resets += 1
            self.apm = self.make_apm()
            self._generation = self.tap.generation
            log.debug("echo canceller: a fresh module")

    def _go_to_rest(self) -> None:
        self.active = False
        self.stats.rests += 1
        dt = self.doubletalk
        log.debug("echo canceller resting: %d chunks, %d resyncs, echo %d ms late, residual "
                  "coupling %s dB, "
                  "speaker->mic %s dB, %d ducks (%d recovered), %d chunks guarded",
                  self.stats.chunks, self.stats.resyncs, dt.lag * 10,
                  "?" if dt.coupling_db is None else f"{dt.coupling_db:.0f}",
                  "?" if dt.erl_db is None else f"{dt.erl_db:.0f}",
                  dt.stats.ducks, dt.stats.recoveries, dt.stats.guarded_chunks)
        self._ref_pos = None
        self.tap.duck = 1.0
        self.doubletalk.rest()

    def _reference(self, t: float) -> tuple[bytearray, int]:
        """10 ms of what the speaker played from DAC time ``t`` (zeros where nothing did), as
        bytes at the speaker's rate, and that rate."""
        tap = self.tap
        rate = tap.rate or RATE
        n = rate // 100
        if len(self._ref) != n:
            self._ref = np.zeros(n, dtype=np.int16)
        if tap.segment != self._segment:
            self._segment, self._ref_pos = tap.segment, None
        wanted = tap.timeline.index_at(t) if tap.playing else None
        if wanted is None:
            self._ref_pos = None
            self._ref[:] = 0
            return bytearray(self._ref.tobytes()), rate
        target = round(wanted)
        if self._ref_pos is None or abs(self._ref_pos - target) > n:
            if self._ref_pos is not None:
                self.stats.resyncs += 1
            self._ref_pos = target
        elif abs(self._ref_pos - target) > rate // 1000:  # drift: one sample at a time
            self._ref_pos += 1 if target > self._ref_pos else -1
        tap.read(self._ref_pos, n, self._ref)
        self._ref_pos += n
        self._remember(self._ref, rate)
        return bytearray(self._ref.tobytes()), rate

    def _remember(self, ref: np.ndarray, rate: int) -> None:
        """The last ``TONAL_MS`` of reference and its power spectrum, held with the room's
        decay, for :meth:`_echo_like`."""
        if self._held_rate != rate or not len(self._ref_history):
            self._ref_history = np.zeros(rate * TONAL_MS // 1000)
            self._held, self._held_rate = np.zeros(TONAL_NFFT // 2 + 1), rate
        _shift_in(self._ref_history, ref)
        h = self._ref_history
        spectrum = np.abs(np.fft.rfft(h * np.hanning(len(h)), TONAL_NFFT)) ** 2
        np.maximum(spectrum, self._held * TONAL_DECAY, out=self._held)

    def _echo_like(self) -> bool:
        """The reference is tonal (a few spectral peaks hold most of its recent energy) and so
        is the output's last ``TONAL_MS``, at those frequencies: the canceller's residual on
        a note, not a person."""
        held = self._held
        total = held.sum()
        if total <= 0:
            return False
        peaks = np.argpartition(held, -TONAL_PEAKS)[-TONAL_PEAKS:]
        if held[peaks].sum() < TONAL_SHARE * total:
            return False  # speech, noise: broadband
        hz = np.fft.rfftfreq(TONAL_NFFT, 1 / self._held_rate)[peaks]
        o = self._out_history
        out_spectrum = np.abs(np.fft.rfft(o * np.hanning(len(o)), TONAL_NFFT)) ** 2
        out_hz = np.fft.rfftfreq(TONAL_NFFT, 1 / RATE)
        near = np.abs(out_hz[:, np.newaxis] - hz[np.newaxis, :]).min(axis=1) < TONAL_HZ
        return bool(out_spectrum[near].sum() >= TONAL_SHARE * out_spectrum.sum())

    def _chunk(self, mic: np.ndarray, t: float) -> np.ndarray:
        ref, rate = self._reference(t + LEAD_MS / 1000)
        data = bytearray(mic.tobytes())
        try:
            self.apm.process_reverse_stream(self._frame(ref, rate, 1, rate // 100))
            self.apm.set_stream_delay_ms(LEAD_MS)
            self.apm.process_stream(self._frame(data, RATE, 1, CHUNK))
        except RuntimeError:
            self.stats.errors += 1
            return mic
        self.stats.chunks += 1
        out = np.frombuffer(data, dtype=np.int16)
        _shift_in(self._out_history, out)
        before = self.doubletalk.stats.evidence_chunks
        duck, gain = self.doubletalk.update(rms_dbfs(out), rms_dbfs(self._ref), rms_dbfs(mic), t,
                                            self._echo_like)
        if TRACE:
            _trace(mic, self._ref, out)
        if TRACE and self.doubletalk.stats.evidence_chunks != before:
            dt = self.doubletalk
            log.debug("evidence at %.2f: out %.0f mic %.0f ref %.0f hold %.0f coupling %.0f "
                      "erl %.0f", t, rms_dbfs(out), rms_dbfs(mic), rms_dbfs(self._ref),
                      dt.hold_dbfs, dt.coupling_db or 0, dt.erl_db or 0)
        if duck != self.tap.duck:
            log.debug("echo canceller: %s the playback (someone speaking over it?)",
                      "ducking" if duck < 1.0 else "restoring")
        self.tap.duck = duck
        if gain != 1.0:
            out = np.round(out * gain).astype(np.int16)
        return out


def _shift_in(history: np.ndarray, block: np.ndarray) -> None:
    """``history`` moves ``len(block)`` to the left and ends with ``block``."""
    n = len(block)
    history[:-n] = history[n:]
    history[-n:] = block


#: ``R2D2_ECHO``: the canceller, today's half-duplex gate, or nothing (a headset).
MODES = ("aec", "half", "off")
UNAVAILABLE = ("no echo canceller (pip install livekit): half duplex, the microphone is held "
               "back while the robot speaks")
_warned = False


def resolve_mode(requested: str) -> str:
    """The echo handling a run gets for ``R2D2_ECHO``: ``aec`` needs the livekit package and
    falls back to ``half`` without it (one warning per process, never an exit)."""
    global _warned
    if requested != "aec" or load_apm() is not None:
        return requested
    if not _warned:
        _warned = True
        log.warning("R2D2_ECHO=aec: %s", UNAVAILABLE)
    return "half"


@dataclass
class EchoStage:
    """The two halves of one run's canceller: the speaker's tap and the microphone's side."""

    tap: SpeakerTap
    canceller: EchoCanceller


def echo_stage(requested: str) -> EchoStage | None:
    """The canceller for ``R2D2_ECHO=requested``, or None (``half``, ``off``, or no livekit)."""
    if resolve_mode(requested) != "aec":
        return None
    make = load_apm()
    assert make is not None
    tap = SpeakerTap()
    return EchoStage(tap, EchoCanceller(make, tap))


def _trace(mic: np.ndarray, ref: np.ndarray, out: np.ndarray) -> None:
    """Append one chunk of each to R2D2_ECHO_TRACE's files (tuning only: blocking writes)."""
    assert TRACE is not None
    for name, data in (("mic", mic), ("ref", ref), ("out", out)):
        with open(os.path.join(TRACE, f"{name}.raw"), "ab") as f:
            f.write(np.asarray(data, dtype="<i2").tobytes())
