"""Sound files in and out: load any audio file as 24 kHz mono PCM16, write replies as WAV.

Reading goes through libsndfile (soundfile), so every WAV flavour (8/16/24/32-bit integer,
float32/64, any channel count, WAVE_FORMAT_EXTENSIBLE) and FLAC, OGG, ... are accepted;
resampling uses soxr. Unusable files raise :class:`UsageError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import numpy as np
import soundfile as sf

from r2d2voice.audio.pcm import RATE, Resampler, bytes_to_pcm16, float_to_pcm16, to_mono
from r2d2voice.errors import RuntimeFailure, UsageError

# Decoded in blocks of this many source frames so a long file never exists as float64 in
# memory all at once; only the int16 24 kHz result is kept.
_READ_BLOCK_FRAMES = 1 << 16

# soundfile/libsndfile raise assorted exception types for malformed input.
_DECODE_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError, OverflowError)


def _show(path: str | os.PathLike[str]) -> str:
    """The path as shown in a one-line message (repr only if it would break the line)."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _os_reason(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file",
        errno.EISDIR: "is a directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a parent of it is not a directory",
        errno.ENOSPC: "no space left on device",
        errno.EROFS: "read-only file system",
        errno.ENXIO: "a pipe with no reader",
    }
    return reasons.get(exc.errno or 0, _one_line(exc.strerror or exc))


def _decode_reason(exc: BaseException) -> str:
    detail = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    detail = _one_line(detail).rstrip(".")
    return f"not a readable audio file ({detail})"


def _checked(path: str | os.PathLike[str], shown: str) -> None:
    """A precise reason (missing, permission, not a regular file) before libsndfile opens it.

    soundfile then opens the path itself: its file-object mode prints tracebacks from cffi
    callbacks on bad input. O_NONBLOCK: opening a FIFO must not hang waiting for a writer.
    """
    if os.path.isdir(path):
        raise UsageError(f"cannot read audio file {shown}: is a directory")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not regular:
        raise UsageError(f"cannot read audio file {shown}: not a regular file")


@contextmanager
def _read_errors(shown: str) -> Iterator[None]:
    """OS and libsndfile errors become one-line UsageErrors naming the file."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot read audio file {shown}: {_os_reason(exc)}") from None
    except _DECODE_ERRORS as exc:
        raise UsageError(f"cannot read audio file {shown}: {_decode_reason(exc)}") from None


class AudioReader:
    """A sound file streamed as 24 kHz mono int16 blocks, in memory flat in the file's length.

    Opening checks the file (one-line :class:`UsageError` naming it, as :func:`load_audio`);
    :meth:`blocks` decodes, downmixes and resamples one libsndfile block at a time. A file that
    turns out truncated mid-way ends early with what could be decoded (``truncated`` is set),
    and so does one cut short (less audio than its header says: ``truncated`` from the start).
    """

    def __init__(self, path: str | os.PathLike[str], block_frames: int = _READ_BLOCK_FRAMES
                 ) -> None:
        self.path = path
        self.shown = _show(path)
        self.block_frames = block_frames
        self.truncated = False
        with _read_errors(self.shown):
            _checked(path, self.shown)
            with sf.SoundFile(path) as snd:
                if snd.channels < 1:
                    raise UsageError(f"cannot read audio file {self.shown}: it has no audio "
                                     "channels")
                if snd.samplerate < 1:
                    raise UsageError(f"cannot read audio file {self.shown}: invalid sample rate")
                self.samplerate = snd.samplerate
                self.frames = snd.frames
                self.truncated = _cut_short(snd)
        self.frames_decoded = 0  # source frames decoded so far
        if self.frames == 0:
            raise UsageError(f"cannot read audio file {self.shown}: it contains no audio "
                             "(0 frames)")

    @property
    def seconds(self) -> float:
        """The file's length as its header says."""
        return self.frames / self.samplerate

    @property
    def seconds_decoded(self) -> float:
        """The audio decoded so far (all of it once :meth:`blocks` is done)."""
        return self.frames_decoded / self.samplerate

    def blocks(self) -> Iterator[np.ndarray]:
        """24 kHz mono int16 blocks of the whole file, then the resampler's tail."""
        resampler = Resampler(self.samplerate, RATE, channels=1)
        decoded = 0
        with _read_errors(self.shown), sf.SoundFile(self.path) as snd:
            while True:
                try:
                    block = snd.read(self.block_frames, dtype="float32", always_2d=True)
                except _DECODE_ERRORS:
                    self.truncated = True
                    break
                if not len(block):
                    if decoded < self.frames:  # the stream ended before its header said
                        self.truncated = True
                    break
                decoded += len(block)
                self.frames_decoded = decoded
                # Float files may hold NaN/inf or values far out of range: keep the filter finite.
                np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
                np.clip(block, -1.0, 1.0, out=block)
                out = float_to_pcm16(resampler.process(to_mono(block)))
                if len(out):
                    yield out
        tail = float_to_pcm16(resampler.process(np.zeros(0, np.float32), last=True))
        if len(tail):
            yield tail


def _cut_short(snd: sf.SoundFile) -> bool:
    """The file holds less audio than its header says. libsndfile then reads what is there
    and says so only in its log: ``data : 192000 (should be 63946)`` (WAV), ``SSND : …``
    (AIFF)."""
    return any(line.strip().startswith(("data ", "SSND ")) and "(should be" in line
               for line in snd.extra_info.splitlines())


class WavWriter:
    """Writes 24 kHz mono PCM16 WAV incrementally; a valid file after close, even if empty.

    ``write`` takes int16 samples (or little-endian PCM16 bytes). Usable as a context manager.
    A regular (or new) ``path`` is written under a temporary name beside it (mode 0600, like
    the database: a reply is as private as its transcript) and renamed over it at
    :meth:`close`, so a reader never sees half a file; with ``keep_existing`` an existing
    file is left as it was when nothing was written (``kept_existing``). A device or FIFO
    (``/dev/null``) is written in place.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_existing: bool = False) -> None:
        self.path = path
        self._shown = _show(path)
        self.frames_written = 0
        self.keep_existing = keep_existing
        self.kept_existing = False
        if os.path.isdir(path):
            raise UsageError(f"cannot write WAV file {self._shown}: is a directory")
        target = os.path.realpath(path)  # a symlink stays one: its file is replaced
        in_place = os.path.exists(target) and not os.path.isfile(target)
        self._target = target
        self._temp: str | None = None
        try:
            if in_place:
                # O_NONBLOCK: a FIFO without a reader fails instead of hanging.
                os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
                where = target
            else:
                if os.path.exists(target):  # a file we may not write is not replaced either
                    os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
                fd, where = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                             suffix=".part", dir=os.path.dirname(target))
                os.close(fd)
                self._temp = where
            # soundfile opens the path itself: its file-object mode prints tracebacks from
            # cffi callbacks when a write fails.
            self._snd: sf.SoundFile | None = sf.SoundFile(
                where, "w", samplerate=RATE, channels=1, format="WAV", subtype="PCM_16"
            )
        except OSError as exc:
            self._discard()
            raise UsageError(f"cannot write WAV file {self._shown}: {_os_reason(exc)}") from None
        except _DECODE_ERRORS as exc:
            self._discard()
            raise UsageError(f"cannot write WAV file {self._shown}: {_one_line(exc)}") from None

    def _discard(self) -> None:
        temp, self._temp = self._temp, None
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)

    @property
    def closed(self) -> bool:
        return self._snd is None

    def write(self, pcm: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Append samples (1-D int16 array, or PCM16 little-endian bytes)."""
        if self._snd is None:
            raise ValueError(f"WAV file {self._shown} is closed")
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = bytes_to_pcm16(pcm)
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"WavWriter takes 1-D int16 audio, got {pcm.dtype} {pcm.shape}")
        if not len(pcm):
            return
        try:
            self._snd.write(pcm)
        except (*_DECODE_ERRORS, OSError) as exc:
            raise RuntimeFailure(f"cannot write WAV file {self._shown}: {_one_line(exc)}") from None
        self.frames_written += len(pcm)

    def close(self) -> None:
        """Finish the header, close the file and put it in place (idempotent); with
        ``keep_existing`` and nothing written, an existing file is left alone."""
        snd, self._snd = self._snd, None
        if snd is None:
            return
        try:
            snd.close()
            if self._temp is not None:
                if (self.keep_existing and not self.frames_written
                        and os.path.exists(self._target)):
                    self.kept_existing = True
                    self._discard()
                else:
                    os.replace(self._temp, self._target)
                    self._temp = None
        except (*_DECODE_ERRORS, OSError) as exc:
            self._discard()
            raise RuntimeFailure(f"cannot write WAV file {self._shown}: {_one_line(exc)}") from None

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
