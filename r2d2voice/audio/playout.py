"""Reply audio waiting for the speaker: a bounded, thread-safe queue of 24 kHz mono int16 audio.

Filled by the downlink (trio thread), drained by the PortAudio output callback (or a WAV sink).
Every method takes one :class:`threading.Lock` for a short, bounded amount of work; nothing
blocks and :meth:`PlayoutBuffer.read_into` allocates no sample buffers, so it is safe to call
from an audio callback. Each item's received and played sample counts are kept so that an
interrupted reply can be truncated at exactly what the user heard.

Volume: :meth:`PlayoutBuffer.set_gain` scales audio as it is pushed (on the producer's thread,
never in the audio callback); audio already queued keeps the volume it was queued at. What
each read hands out (after the volume: what reaches the speaker) goes to the tap, if one is set
(:meth:`PlayoutBuffer.set_tap`: the speaker's level meter).

Time: the first sample of each item is stamped with the buffer's ``clock``, which must be
callable from the consumer's thread (the PortAudio callback cannot ask trio for the time):
``time.monotonic`` by default. Whoever compares a stamp with another clock converts it by
elapsed time (``other_now - (buffer.clock() - stamp)``), as the link does.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from r2d2voice.audio.pcm import RATE

#: Per-item bookkeeping kept for this many most recent items (bounded for weeks-long runs).
MAX_TRACKED_ITEMS = 256


@dataclass(frozen=True)
class AudioChunk:
    """A piece of one reply item's audio (int16 mono 24 kHz)."""

    item_id: str
    pcm: np.ndarray


@dataclass(frozen=True)
class PlayoutStatistics:
    """Counters since the buffer was created (all in samples at 24 kHz, except underruns).

    ``dropped_samples``: discarded because the buffer was full (oldest first).
    ``cancelled_samples``: discarded on purpose (cancel, clear, or audio arriving for a cancelled
    item). ``underruns``: times the consumer reported it had to play silence.
    """

    queued_samples: int
    dropped_samples: int
    cancelled_samples: int
    underruns: int
    played_samples: int


class _Item:
    __slots__ = ("cancelled", "first_played_at", "played", "received")

    def __init__(self) -> None:
        self.received = 0
        self.played = 0
        self.first_played_at: float | None = None  # buffer clock at the first sample out
        self.cancelled = False


class PlayoutBuffer:
    """Bounded FIFO of reply audio, tagged by conversation item id.

    Policy when full: :meth:`push` never blocks; the OLDEST queued samples are dropped and
    counted in ``dropped_samples`` (the downlink never waits for the speaker).
    """

    def __init__(
        self, capacity_samples: int = 60 * RATE, max_items: int = MAX_TRACKED_ITEMS, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_samples < 1:
            raise ValueError("capacity_samples must be >= 1")
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.capacity_samples = capacity_samples
        self._max_items = max_items
        self._lock = threading.Lock()
        self._chunks: deque[AudioChunk] = deque()
        self._head_offset = 0  # samples of _chunks[0] already played or dropped
        self._queued = 0
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._dropped = 0
        self._cancelled = 0
        self._underruns = 0
        self._played = 0
        self.clock = clock
        self._listener: Callable[[], None] | None = None
        self._tap: Callable[[np.ndarray], None] | None = None
        self._gain = 1.0

    @property
    def gain(self) -> float:
        return self._gain

    def set_gain(self, gain: float) -> None:
        """Linear amplitude (0..1) for audio pushed from now on."""
        if not 0.0 <= gain <= 1.0:
            raise ValueError(f"gain must be between 0 and 1, got {gain!r}")
        self._gain = gain

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener()`` when audio starts or stops being queued and when an item's first
        sample is handed out. It runs outside the lock on whichever thread pushed, cancelled or
        read (the PortAudio callback too), so it must be quick and thread-safe."""
        self._listener = listener

    def set_tap(self, tap: Callable[[np.ndarray], None] | None) -> None:
        """Call ``tap(samples)`` with the audio each read hands out (the speaker's level meter,
        ``audio/level.py``). It runs outside the lock on the consumer's thread (the PortAudio
        callback too) with a view it must not keep, so it must be quick and allocate
        nothing."""
        self._tap = tap

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()

    # -- bookkeeping (lock held) --------------------------------------------------------------

    def _item(self, item_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item()
            if len(self._items) > self._max_items:
                self._items.popitem(last=False)
        return item

    def _discard_head(self, n: int) -> None:
        """Remove up to n samples from the head without playing them."""
        while n > 0 and self._chunks:
            head = self._chunks[0]
            take = min(n, len(head.pcm) - self._head_offset)
            self._head_offset += take
            self._queued -= take
            n -= take
            if self._head_offset == len(head.pcm):
                self._chunks.popleft()
                self._head_offset = 0

    # -- producer side ------------------------------------------------------------------------

    def push(self, item_id: str, pcm: np.ndarray) -> None:
        """Queue audio for ``item_id``; never blocks (drop-oldest when full, see class doc)."""
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"PlayoutBuffer takes 1-D int16 audio, got {pcm.dtype} {pcm.shape}")
        # Copy (scaled) outside the lock: the caller may reuse its array.
        gain = self._gain
        pcm = pcm.copy() if gain == 1.0 else np.round(pcm * gain).astype(np.int16)
        n = len(pcm)
        with self._lock:
            item = self._item(item_id)
            item.received += n
            if item.cancelled:
                self._cancelled += n
                return
            if n == 0:
                return
            if n > self.capacity_samples:
                # The chunk alone overflows: keep only its newest part.
                self._dropped += n - self.capacity_samples
                pcm = pcm[n - self.capacity_samples :]
                n = len(pcm)
            overflow = self._queued + n - self.capacity_samples
            if overflow > 0:
                self._dropped += overflow
                self._discard_head(overflow)
            self._chunks.append(AudioChunk(item_id, pcm))
            started = self._queued == 0
            self._queued += n
        if started:
            self._notify()

    def cancel(self, item_id: str) -> int:
        """Drop ``item_id``'s queued audio and any later push for it; return samples dropped."""
        with self._lock:
            item = self._item(item_id)
            item.cancelled = True
            if not any(c.item_id == item_id for c in self._chunks):
                return 0
            dropped = 0
            kept: deque[AudioChunk] = deque()
            for i, chunk in enumerate(self._chunks):
                if chunk.item_id == item_id:
                    dropped += len(chunk.pcm) - (self._head_offset if i == 0 else 0)
                else:
                    kept.append(chunk)
            if self._chunks[0].item_id == item_id:
                self._head_offset = 0  # the new head (if any) is untouched
            self._chunks = kept
            self._queued -= dropped
            self._cancelled += dropped
            drained = dropped > 0 and self._queued == 0
        if drained:
            self._notify()
        return dropped

    def clear(self) -> int:
        """Drop everything queued (items are not marked cancelled); return samples dropped."""
        with self._lock:
            dropped = self._queued
            self._chunks.clear()
            self._head_offset = 0
            self._queued = 0
            self._cancelled += dropped
        if dropped:
            self._notify()
        return dropped

    # -- consumer side ------------------------------------------------------------------------

    def read_into(self, out: np.ndarray) -> int:
        """Fill ``out`` (1-D int16) with queued audio; zero the rest; return samples written.

        Spans item boundaries and credits each item's played count. No sample buffer is
        allocated, so it is fit for a PortAudio callback.
        """
        n = len(out)
        written = 0
        notify = False
        with self._lock:
            while written < n and self._chunks:
                head = self._chunks[0]
                start = self._head_offset
                take = min(n - written, len(head.pcm) - start)
                out[written : written + take] = head.pcm[start : start + take]
                written += take
                item = self._items.get(head.item_id)
                if item is not None:
                    if item.played == 0 and take:
                        item.first_played_at = self.clock()
                        notify = True
                    item.played += take
                self._head_offset = start + take
                if self._head_offset == len(head.pcm):
                    self._chunks.popleft()
                    self._head_offset = 0
            self._queued -= written
            self._played += written
            notify = notify or (written > 0 and self._queued == 0)
        if written < n:
            out[written:] = 0
        tap = self._tap
        if tap is not None and written:
            tap(out[:written])
        if notify:
            self._notify()
        return written

    def read(self, n: int) -> np.ndarray:
        """Up to ``n`` samples of queued audio (shorter or empty when less is queued)."""
        out = np.empty(max(0, n), dtype=np.int16)
        written = self.read_into(out)
        return out[:written]

    def note_underrun(self) -> None:
        """Record that the consumer had to play silence for lack of audio."""
        with self._lock:
            self._underruns += 1

    # -- queries ------------------------------------------------------------------------------

    def played_samples(self, item_id: str) -> int:
        """Samples of ``item_id`` handed to the consumer so far (0 if unknown or forgotten)."""
        with self._lock:
            item = self._items.get(item_id)
            return item.played if item is not None else 0

    def first_played_at(self, item_id: str) -> float | None:
        """Time on :attr:`clock` when the first sample of ``item_id`` was handed out."""
        with self._lock:
            item = self._items.get(item_id)
            return item.first_played_at if item is not None else None

    def received_samples(self, item_id: str) -> int:
        """Samples pushed for ``item_id`` so far, including dropped ones (0 if unknown)."""
        with self._lock:
            item = self._items.get(item_id)
            return item.received if item is not None else 0

    def holds(self, item_id: str) -> bool:
        """Some of ``item_id``'s audio is queued (not yet handed out, dropped or cancelled)."""
        with self._lock:
            return any(c.item_id == item_id for c in self._chunks)

    def playing_item(self) -> str | None:
        """The item whose audio is at the head of the queue, or None when nothing is queued."""
        with self._lock:
            return self._chunks[0].item_id if self._chunks else None

    def queued_samples(self) -> int:
        with self._lock:
            return self._queued

    def tracked_items(self) -> int:
        """How many items have bookkeeping (at most ``max_items``)."""
        with self._lock:
            return len(self._items)

    def statistics(self) -> PlayoutStatistics:
        with self._lock:
            return PlayoutStatistics(
                queued_samples=self._queued,
                dropped_samples=self._dropped,
                cancelled_samples=self._cancelled,
                underruns=self._underruns,
                played_samples=self._played,
            )
