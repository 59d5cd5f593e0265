"""The playout buffer: drop-oldest policy, cancellation, per-item played counts, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from r2d2voice.audio.pcm import RATE
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer, PlayoutStatistics


def ramp(start: int, n: int) -> np.ndarray:
    """Distinct, recognisable samples: start, start+1, ..."""
    return (np.arange(start, start + n) % 30000).astype(np.int16)


def test_fifo_order_across_items_and_played_counts() -> None:
    buf = PlayoutBuffer()
    buf.push("a", ramp(0, 300))
    buf.push("a", ramp(300, 300))
    buf.push("b", ramp(600, 500))
    assert buf.playing_item() == "a"
    assert buf.queued_samples() == 1100
    first = buf.read(450)
    assert first.tolist() == list(range(450))
    assert (buf.played_samples("a"), buf.played_samples("b")) == (450, 0)
    # One read spanning the a -> b boundary credits each item with its own share.
    second = buf.read(400)
    assert second.tolist() == list(range(450, 850))
    assert (buf.played_samples("a"), buf.played_samples("b")) == (600, 250)
    assert buf.playing_item() == "b"
    rest = buf.read(10_000)  # shorter than asked: the caller pads with silence
    assert rest.tolist() == list(range(850, 1100))
    assert buf.read(10).size == 0
    assert buf.playing_item() is None
    assert (buf.played_samples("a"), buf.played_samples("b")) == (600, 500)
    assert (buf.received_samples("a"), buf.received_samples("b")) == (600, 500)
    assert buf.played_samples("unknown") == buf.received_samples("unknown") == 0
    assert buf.statistics() == PlayoutStatistics(
        queued_samples=0, dropped_samples=0, cancelled_samples=0, underruns=0, played_samples=1100
    )


def test_push_copies_the_callers_array() -> None:
    buf = PlayoutBuffer()
    pcm = ramp(0, 100)
    buf.push("a", pcm)
    pcm[:] = 0
    assert buf.read(100).tolist() == list(range(100))


def test_capacity_drops_oldest_and_counts() -> None:
    buf = PlayoutBuffer(capacity_samples=1000)
    buf.push("a", ramp(0, 600))
    buf.read(100)  # head offset inside the first chunk
    buf.push("b", ramp(600, 700))  # 500 + 700 queued > 1000: the 200 oldest go
    stats = buf.statistics()
    assert stats.queued_samples == 1000 and stats.dropped_samples == 200
    out = buf.read(2000)
    assert out.tolist() == list(range(300, 1300))
    assert buf.played_samples("a") == 400  # 100 + 300: the dropped 200 were never heard
    assert buf.played_samples("b") == 700
    assert buf.received_samples("a") == 600


def test_chunk_larger_than_capacity_keeps_its_newest_part() -> None:
    buf = PlayoutBuffer(capacity_samples=1000)
    buf.push("a", ramp(0, 400))
    buf.push("b", ramp(400, 1500))
    assert buf.statistics().dropped_samples == 400 + 500
    assert buf.playing_item() == "b"
    assert buf.read(5000).tolist() == list(range(900, 1900))


def test_drop_oldest_across_many_chunks() -> None:
    buf = PlayoutBuffer(capacity_samples=RATE)
    for i in range(100):  # 100 x 20 ms = 2 s into a 1 s buffer
        buf.push(f"item{i // 10}", ramp(i * 480, 480))
    stats = buf.statistics()
    assert stats.queued_samples == RATE and stats.dropped_samples == 100 * 480 - RATE
    assert buf.playing_item() == "item5"
    assert buf.read(RATE)[0] == 100 * 480 - RATE


def test_cancel_drops_queued_audio_and_later_pushes() -> None:
    buf = PlayoutBuffer()
    buf.push("a", ramp(0, 500))
    buf.push("b", ramp(500, 300))
    buf.push("a", ramp(800, 200))  # interleaved chunk of a, after b
    buf.read(100)
    assert buf.cancel("a") == 400 + 200
    assert buf.playing_item() == "b"
    assert buf.queued_samples() == 300
    buf.push("a", ramp(0, 1000))  # late audio for a cancelled item is discarded
    assert buf.queued_samples() == 300
    assert buf.read(1000).tolist() == list(range(500, 800))
    assert buf.played_samples("a") == 100
    assert buf.received_samples("a") == 1700
    stats = buf.statistics()
    assert stats.cancelled_samples == 600 + 1000 and stats.dropped_samples == 0
    assert buf.cancel("a") == 0


def test_cancel_before_any_audio_and_of_a_middle_item() -> None:
    buf = PlayoutBuffer()
    assert buf.cancel("future") == 0
    buf.push("future", ramp(0, 100))
    assert buf.queued_samples() == 0
    buf.push("a", ramp(0, 10))
    buf.push("b", ramp(10, 10))
    buf.push("c", ramp(20, 10))
    buf.read(5)
    assert buf.cancel("b") == 10
    assert buf.read(100).tolist() == [*range(5, 10), *range(20, 30)]


def test_clear_drops_everything_but_does_not_cancel() -> None:
    buf = PlayoutBuffer()
    buf.push("a", ramp(0, 500))
    buf.push("b", ramp(0, 500))
    buf.read(200)
    assert buf.clear() == 800
    assert buf.queued_samples() == 0 and buf.playing_item() is None
    buf.push("a", ramp(0, 50))  # a was not cancelled: new audio plays
    assert buf.read(100).size == 50
    assert buf.played_samples("a") == 250
    assert buf.statistics().cancelled_samples == 800


def test_read_into_zero_fills_the_rest() -> None:
    buf = PlayoutBuffer()
    out = np.full(480, 7, dtype=np.int16)
    assert buf.read_into(out) == 0
    assert not out.any()
    buf.push("a", ramp(1, 100))
    out[:] = 7
    assert buf.read_into(out) == 100
    assert out[:100].tolist() == list(range(1, 101))
    assert not out[100:].any()
    buf.note_underrun()
    buf.note_underrun()
    assert buf.statistics().underruns == 2


def test_rejects_audio_that_is_not_int16_mono() -> None:
    buf = PlayoutBuffer()
    with pytest.raises(ValueError):
        buf.push("a", np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError):
        buf.push("a", np.zeros((10, 2), dtype=np.int16))
    assert buf.queued_samples() == 0


def test_item_bookkeeping_is_bounded() -> None:
    buf = PlayoutBuffer(capacity_samples=1000, max_items=256)
    for i in range(10_000):
        buf.push(f"item_{i}", ramp(0, 10))
        buf.read(10)
    assert buf.tracked_items() == 256
    assert buf.played_samples("item_9999") == 10
    assert buf.played_samples("item_9744") == 10  # the 256th most recent is still known
    assert buf.played_samples("item_0") == 0  # long forgotten
    for i in range(1000):
        buf.cancel(f"gone_{i}")
    assert buf.tracked_items() == 256


def test_audio_chunk_is_a_frozen_record() -> None:
    chunk = AudioChunk("item", ramp(0, 3))
    with pytest.raises(AttributeError):
        chunk.item_id = "other"  # type: ignore[misc]


def test_threads_conserve_every_sample() -> None:
    """A writer thread pushes while a reader thread drains; nothing is lost or duplicated."""
    buf = PlayoutBuffer(capacity_samples=10 * RATE)
    total_items, per_item, chunk = 40, 4800, 480
    done = threading.Event()
    received: list[np.ndarray] = []

    def writer() -> None:
        for i in range(total_items):
            for start in range(0, per_item, chunk):
                buf.push(f"item{i}", ramp(i * per_item + start, chunk))
        done.set()

    def reader() -> None:
        out = np.zeros(441, dtype=np.int16)
        while True:
            finished = done.is_set()  # read before draining: no push can follow an empty read
            n = buf.read_into(out)
            received.append(out[:n].copy())
            if n == 0 and finished:
                return

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    got = np.concatenate(received)
    assert got.tolist() == ramp(0, total_items * per_item).tolist()
    assert all(buf.played_samples(f"item{i}") == per_item for i in range(total_items))
    stats = buf.statistics()
    assert stats.played_samples == total_items * per_item
    assert stats.dropped_samples == stats.queued_samples == 0


def test_threads_with_overflow_and_cancels_account_for_every_sample() -> None:
    buf = PlayoutBuffer(capacity_samples=2000)
    pushed = 0
    done = threading.Event()
    played: list[int] = []

    def writer() -> None:
        nonlocal pushed
        for i in range(3000):
            buf.push(f"item{i % 50}", ramp(0, 97))
            pushed += 97
            if i % 7 == 0:
                buf.cancel(f"item{(i + 3) % 50}")
        done.set()

    def reader() -> None:
        out = np.zeros(64, dtype=np.int16)
        while not done.is_set() or buf.queued_samples():
            played.append(buf.read_into(out))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    stats = buf.statistics()
    assert stats.queued_samples == 0
    assert sum(played) == stats.played_samples
    assert stats.played_samples + stats.dropped_samples + stats.cancelled_samples == pushed
    assert sum(buf.received_samples(f"item{i}") for i in range(50)) == pushed


def test_first_sample_is_stamped_with_the_injected_clock() -> None:
    now = [100.0]
    buf = PlayoutBuffer(clock=lambda: now[0])
    buf.push("a", ramp(0, 480))
    assert buf.first_played_at("a") is None  # queued, not played
    now[0] = 101.5
    buf.read(100)
    now[0] = 102.0
    buf.read(100)
    assert buf.first_played_at("a") == 101.5  # the first sample, not the latest
    assert buf.first_played_at("unknown") is None


def test_the_listener_hears_start_first_sample_and_drain() -> None:
    buf = PlayoutBuffer()
    calls: list[int] = []
    buf.set_listener(lambda: calls.append(buf.queued_samples()))
    buf.push("a", ramp(0, 300))  # started: 300 queued
    buf.push("a", ramp(0, 300))  # more of the same: no news
    assert calls == [300]
    buf.read(100)  # a's first sample out
    buf.read(100)  # nothing new
    assert calls == [300, 500]
    buf.read(1000)  # drained
    assert calls == [300, 500, 0]
    buf.push("b", ramp(0, 100))
    buf.cancel("b")  # cancelled to empty: drained too
    assert calls == [300, 500, 0, 100, 0]
    buf.set_listener(None)
    buf.push("c", ramp(0, 10))
    assert len(calls) == 5


def test_the_listener_runs_on_the_reading_thread_outside_the_lock() -> None:
    buf = PlayoutBuffer()
    seen: list[tuple[str, int]] = []
    # the listener may use the buffer itself: it would deadlock if called under the lock
    buf.set_listener(lambda: seen.append((threading.current_thread().name,
                                          buf.queued_samples())))
    buf.push("a", ramp(0, 480))
    reader = threading.Thread(target=lambda: buf.read(480), name="audio-callback")
    reader.start()
    reader.join(timeout=10)
    assert seen == [("MainThread", 480), ("audio-callback", 0)]


def test_gain_scales_audio_as_it_is_pushed() -> None:
    buf = PlayoutBuffer()
    loud = np.array([20000, -20000, 1000, -3], np.int16)
    buf.push("a", loud)
    buf.set_gain(0.25)  # set_volume 50 %: audio queued from now on is quieter
    buf.push("b", loud)
    assert buf.gain == 0.25
    assert buf.read(8).tolist() == [20000, -20000, 1000, -3, 5000, -5000, 250, -1]
    buf.set_gain(0.0)
    buf.push("c", loud)
    assert buf.read(4).tolist() == [0, 0, 0, 0] and buf.received_samples("c") == 4
    with pytest.raises(ValueError):
        buf.set_gain(1.5)


def test_the_tap_sees_what_each_read_hands_out_after_the_volume_and_holds_tracks_the_queue(
        ) -> None:
    buf = PlayoutBuffer()
    seen: list[np.ndarray] = []
    buf.set_tap(lambda pcm: seen.append(pcm.copy()))
    buf.set_gain(0.5)
    buf.push("a", np.full(300, 1000, np.int16))
    buf.push("b", np.full(200, 2000, np.int16))
    assert buf.holds("a") and buf.holds("b") and not buf.holds("c")
    out = np.empty(400, np.int16)
    assert buf.read_into(out) == 400
    assert not buf.holds("a") and buf.holds("b")
    buf.read_into(out)  # 100 more, then zeros: the tap sees only what was handed out
    assert [len(x) for x in seen] == [400, 100]
    assert np.concatenate(seen).tolist() == [500] * 300 + [1000] * 200
    buf.push("c", np.full(10, 7, np.int16))
    buf.cancel("c")
    assert not buf.holds("c") and buf.read(10).size == 0 and len(seen) == 2


def test_the_level_meter_gives_the_rms_of_each_50_ms_across_reads() -> None:
    from r2d2voice.audio.level import LEVEL_WINDOW, LevelMeter

    levels: list[float] = []
    wanted = [True]
    meter = LevelMeter(levels.append, lambda: wanted[0])
    t = np.arange(RATE) / RATE
    tone = (np.sin(2 * np.pi * 440 * t) * 16384).astype(np.int16)  # -6 dBFS peak
    for start in range(0, RATE, 240):  # 10 ms blocks, as the speaker pulls them
        meter.feed(tone[start:start + 240])
    assert len(levels) == RATE // LEVEL_WINDOW == 20
    assert levels == pytest.approx([0.5 / 2 ** 0.5] * 20, abs=0.002)
    meter.feed(np.full(LEVEL_WINDOW, 32767, np.int16))
    assert levels[-1] == pytest.approx(1.0, abs=1e-4)
    wanted[0] = False  # nobody follows: nothing is measured (nor kept for later)
    meter.feed(tone)
    wanted[0] = True
    meter.feed(np.zeros(LEVEL_WINDOW // 2, np.int16))
    assert len(levels) == 21
