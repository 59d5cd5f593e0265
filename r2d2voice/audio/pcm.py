"""Frame format, PCM conversions and streaming resampling (numpy + soxr, no I/O, no trio).

The pipeline's internal format is 24 kHz mono PCM16: numpy ``int16`` arrays, or little-endian
bytes on the wire. A frame is 20 ms = 480 samples = 960 bytes.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

RATE = 24000
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000  # 480
FRAME_BYTES = FRAME_SAMPLES * 2  # 960

#: Floor of :func:`rms_dbfs`, returned for digital silence and empty input (keeps it finite).
SILENCE_DBFS = -120.0

_PCM16_SCALE = 32768.0


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of ``x`` (shape ``(n,)`` or ``(n, ch)``); keeps the dtype.

    Integer input is averaged in float and rounded back, so it cannot overflow.
    """
    x = np.asarray(x)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected audio of shape (n,) or (n, channels), got {x.shape}")
    if x.shape[1] == 1:
        return x[:, 0]
    if x.shape[1] == 0:
        raise ValueError("audio has zero channels")
    if x.shape[1] == 2 and x.dtype.kind == "f":
        # the common stereo case, without np.mean's overhead: the same float64 (a + b) / 2
        return (np.add(x[:, 0], x[:, 1], dtype=np.float64) * 0.5).astype(x.dtype)
    mean = x.mean(axis=1, dtype=np.float64)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(x.dtype)
    return mean.astype(x.dtype)


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 (scaled by 32768, rounded, clipped; NaN becomes 0).

    float32 input is worked on in float32: scaling by a power of two is exact, so the result
    equals the float64 computation's, in a fraction of the time (this runs for every block).
    """
    f = np.asarray(x)
    if f.dtype != np.float32:
        f = f.astype(np.float64)
    y = np.clip(f, -2.0, 2.0)  # a new array; far out of range (or inf) clips the same way
    y *= _PCM16_SCALE
    np.rint(y, out=y)
    np.clip(y, -32768, 32767, out=y)
    np.copyto(y, 0, where=np.isnan(y))
    return y.astype(np.int16)


def pcm16_to_float(x: np.ndarray) -> np.ndarray:
    """int16 samples to float32 in [-1, 1) (divided by 32768; exact inverse of float_to_pcm16)."""
    return np.asarray(x, dtype=np.int16).astype(np.float32) / np.float32(_PCM16_SCALE)


def pcm16_to_bytes(x: np.ndarray) -> bytes:
    """int16 samples to little-endian bytes."""
    return np.asarray(x, dtype=np.int16).astype("<i2", copy=False).tobytes()


def bytes_to_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian PCM16 bytes to a writable native int16 array (odd length -> ValueError)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 data has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale square wave is 0 dBFS, a full-scale sine about -3).

    int16 input is scaled by 1/32768, float input is taken as is. Silence and empty input give
    :data:`SILENCE_DBFS` rather than ``-inf``.
    """
    a = np.asarray(x)
    if a.size == 0:
        return SILENCE_DBFS
    f = a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        f /= _PCM16_SCALE
    rms = math.sqrt(float(np.mean(f * f)))
    if rms <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(rms))


class Resampler:
    """Streaming sample-rate converter wrapping :class:`soxr.ResampleStream`.

    Feed consecutive blocks of one continuous signal to :meth:`process`; the filter state is kept
    between calls, so block boundaries leave no clicks and the concatenated output equals the
    signal resampled in one go. Input is float32/float64 or int16, shape ``(n,)`` for one channel
    or ``(n, channels)``; the output has the input's dtype and number of dimensions.

    libsoxr works in internal blocks, so the output comes in bursts: with the default "HQ" quality
    a block may yield nothing and a later one ~35 ms of audio at once (it lags the input by at
    most ~40 ms). A consumer needing exactly N samples per call (a PortAudio callback) must keep a
    small FIFO with that much pre-roll. Cost is a few microseconds per 10-20 ms block.

    When both rates are equal, :meth:`process` returns its input unchanged (no copy, no delay).
    """

    def __init__(self, in_rate: int, out_rate: int, channels: int = 1, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.channels = channels
        self.quality = quality
        # One float32 stream for the whole signal: int16 blocks are converted on the way in and
        # out, so mixing dtypes never splits the filter state. Created eagerly so that an invalid
        # quality fails here and the first live block is not slow.
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32", quality=quality)
        )

    @property
    def identity(self) -> bool:
        """True when the rates are equal and :meth:`process` passes audio through."""
        return self._stream is None

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next block; ``last=True`` flushes the tail and resets for a new signal."""
        x = np.asarray(x)
        if (
            x.ndim not in (1, 2)
            or x.shape[1:] not in ((), (self.channels,))
            or (x.ndim == 1 and self.channels != 1)
        ):
            raise ValueError(f"expected {self.channels} channel(s), got array of shape {x.shape}")
        if x.dtype not in (np.int16, np.float32, np.float64):
            raise TypeError(f"Resampler takes int16, float32 or float64 audio, got {x.dtype}")
        if self._stream is None:
            return x
        if x.dtype == np.int16:
            y = self._stream.resample_chunk(pcm16_to_float(x), last=last)
            out = float_to_pcm16(y)
        else:
            y = self._stream.resample_chunk(np.ascontiguousarray(x, dtype=np.float32), last=last)
            out = y.astype(x.dtype, copy=False)
        if last:
            self._stream.clear()
        return out

    def reset(self) -> None:
        """Forget buffered input (start of an unrelated signal); pending output is discarded."""
        if self._stream is not None:
            self._stream.clear()


class Framer:
    """Cuts int16 mono audio of any block size into exact 20 ms frames of PCM16 bytes."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)

    @property
    def pending_samples(self) -> int:
        """Samples held back until a whole frame is available (always < FRAME_SAMPLES)."""
        return len(self._pending)

    def push(self, x: np.ndarray) -> list[bytes]:
        """Add samples; return every complete frame (FRAME_BYTES each), oldest first."""
        x = np.asarray(x)
        if x.dtype != np.int16 or x.ndim != 1:
            raise ValueError(f"Framer takes 1-D int16 audio, got {x.dtype} {x.shape}")
        data = np.concatenate((self._pending, x)) if len(self._pending) else x
        whole = len(data) - len(data) % FRAME_SAMPLES
        frames = [
            pcm16_to_bytes(data[i : i + FRAME_SAMPLES]) for i in range(0, whole, FRAME_SAMPLES)
        ]
        self._pending = data[whole:].copy()
        return frames

    def flush(self) -> bytes | None:
        """The held-back tail padded with zeros to one frame, or None if nothing is held back."""
        if not len(self._pending):
            return None
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        frame[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.int16)
        return pcm16_to_bytes(frame)
