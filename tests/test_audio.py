"""Frame format, PCM helpers and the streaming resampler."""

from __future__ import annotations

import numpy as np
import pytest

from r2d2voice.audio.pcm import (
    FRAME_BYTES,
    FRAME_MS,
    FRAME_SAMPLES,
    RATE,
    SILENCE_DBFS,
    Framer,
    Resampler,
    bytes_to_pcm16,
    float_to_pcm16,
    pcm16_to_bytes,
    pcm16_to_float,
    rms_dbfs,
    to_mono,
)


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def blockwise(r: Resampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(r.process(x[i : i + n]))
        i, k = i + n, k + 1
    out.append(r.process(x[:0], last=True))
    return np.concatenate(out)


def test_constants() -> None:
    assert (RATE, FRAME_MS, FRAME_SAMPLES, FRAME_BYTES) == (24000, 20, 480, 960)


@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(48000, 24000), (44100, 24000), (24000, 48000), (24000, 44100)]
)
def test_resampler_blockwise_matches_whole_and_ideal_sine(in_rate: int, out_rate: int) -> None:
    x = sine(1000.0, in_rate, 1.0)
    whole = Resampler(in_rate, out_rate).process(x, last=True)
    # 10 ms device blocks, and ragged sizes such as a callback might deliver.
    for sizes in ([in_rate // 100], [1, 7, 300, 1024, 97]):
        parts = blockwise(Resampler(in_rate, out_rate), x, sizes)
        assert parts.dtype == np.float32
        assert len(parts) == len(whole) == round(len(x) * out_rate / in_rate)
        assert np.max(np.abs(parts - whole)) < 1e-4
    # Time-aligned with the ideal sine at the output rate (no delay, no clicks), edges aside.
    ideal = sine(1000.0, out_rate, 1.0)
    mid = slice(out_rate // 20, len(ideal) - out_rate // 20)
    assert np.max(np.abs(whole[mid] - ideal[mid])) < 2e-3
    assert peak_hz(whole, out_rate) == pytest.approx(1000.0, abs=2.0)


def test_resampler_int16_in_int16_out_and_round_trip() -> None:
    x = float_to_pcm16(sine(440.0, 44100, 0.5, amp=0.3))
    down = blockwise(Resampler(44100, RATE), x, [441])
    assert down.dtype == np.int16
    assert len(down) == 12000
    assert peak_hz(down, RATE) == pytest.approx(440.0, abs=2.0)
    back = blockwise(Resampler(RATE, 44100), down, [240])
    assert back.dtype == np.int16 and len(back) == len(x)
    mid = slice(2000, len(x) - 2000)
    assert np.max(np.abs(back[mid].astype(int) - x[mid].astype(int))) < 40  # of 32768
    assert rms_dbfs(back) == pytest.approx(rms_dbfs(x), abs=0.1)


def test_resampler_removes_content_above_new_nyquist() -> None:
    # 15 kHz at 48 kHz cannot exist at 24 kHz: it must be filtered, not aliased to 9 kHz.
    x = sine(15000.0, 48000, 0.5)
    y = Resampler(48000, RATE).process(x, last=True)
    assert rms_dbfs(x) > -10
    assert rms_dbfs(y[1200:-1200]) < -80  # edges aside (the signal starts abruptly)


def test_resampler_stereo_and_reuse_after_last() -> None:
    x = np.stack([sine(500.0, 48000, 0.2), sine(2000.0, 48000, 0.2)], axis=1)
    r = Resampler(48000, RATE, channels=2)
    y = r.process(x, last=True)
    assert y.shape == (4800, 2)
    assert peak_hz(y[:, 0], RATE) == pytest.approx(500.0, abs=10)
    assert peak_hz(y[:, 1], RATE) == pytest.approx(2000.0, abs=10)
    again = r.process(x, last=True)  # last=True resets for a new signal
    assert np.max(np.abs(again - y)) < 1e-6
    with pytest.raises(ValueError):
        r.process(x[:, 0])


def test_resampler_identity_is_a_pass_through() -> None:
    r = Resampler(RATE, RATE)
    x = float_to_pcm16(sine(300.0, RATE, 0.1))
    assert r.identity
    assert r.process(x) is x


def test_resampler_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        Resampler(48000, RATE).process(np.zeros(10, dtype=np.int32))
    with pytest.raises(ValueError):
        Resampler(0, RATE)
    with pytest.raises(ValueError):
        Resampler(48000, RATE, quality="nonsense")


def test_framer_yields_exact_frames_from_any_block_size() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-32768, 32767, size=10_000, dtype=np.int16)
    framer = Framer()
    frames: list[bytes] = []
    i = 0
    for n in [1, 479, 480, 481, 960, 7, 2000, 441, 5151]:
        frames += framer.push(x[i : i + n])
        i += n
    assert i == len(x)
    assert len(frames) == len(x) // FRAME_SAMPLES
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert b"".join(frames) == pcm16_to_bytes(x[: len(frames) * FRAME_SAMPLES])
    assert framer.pending_samples == len(x) % FRAME_SAMPLES
    tail = framer.flush()
    assert tail is not None and len(tail) == FRAME_BYTES
    rest = len(x) % FRAME_SAMPLES
    assert tail[: rest * 2] == pcm16_to_bytes(x[-rest:])
    assert tail[rest * 2 :] == bytes(FRAME_BYTES - rest * 2)
    assert framer.flush() is None


def test_framer_small_pushes_and_rejects_float() -> None:
    framer = Framer()
    assert framer.push(np.ones(479, dtype=np.int16)) == []
    [frame] = framer.push(np.full(1, 2, dtype=np.int16))
    assert bytes_to_pcm16(frame)[-1] == 2
    assert framer.flush() is None
    with pytest.raises(ValueError):
        framer.push(np.zeros(480, dtype=np.float32))


def test_to_mono() -> None:
    stereo = np.array([[100, 300], [-32768, -32768], [32767, 32766], [1, 2]], dtype=np.int16)
    mono = to_mono(stereo)
    assert mono.dtype == np.int16
    assert mono.tolist() == [200, -32768, 32766, 2]  # 32766.5 and 1.5 round to even
    assert to_mono(np.array([[0.5], [0.25]], dtype=np.float32)).tolist() == [0.5, 0.25]
    x = np.arange(5, dtype=np.float32)
    assert to_mono(x) is x
    six = np.tile(np.arange(6, dtype=np.float32), (3, 1))
    assert to_mono(six).tolist() == [2.5, 2.5, 2.5]


def test_pcm_conversions() -> None:
    f = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0, 1e-5, np.nan, np.inf], dtype=np.float32)
    assert float_to_pcm16(f).tolist() == [
        0,
        16384,
        -16384,
        32767,
        -32768,
        32767,
        -32768,
        0,
        0,
        32767,
    ]
    x = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    assert float_to_pcm16(pcm16_to_float(x)).tolist() == x.tolist()
    assert pcm16_to_bytes(x) == b"\x00\x80\xff\xff\x00\x00\x01\x00\xff\x7f"  # little-endian
    back = bytes_to_pcm16(pcm16_to_bytes(x))
    assert back.tolist() == x.tolist() and back.dtype == np.int16 and back.flags.writeable
    with pytest.raises(ValueError):
        bytes_to_pcm16(b"\x00\x01\x02")


def test_rms_dbfs() -> None:
    assert rms_dbfs(sine(1000.0, RATE, 1.0, amp=1.0)) == pytest.approx(-3.01, abs=0.02)
    assert rms_dbfs(float_to_pcm16(sine(1000.0, RATE, 1.0, amp=0.1))) == pytest.approx(
        -23.01, abs=0.02
    )
    assert rms_dbfs(np.zeros(480, dtype=np.int16)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(0, dtype=np.int16)) == SILENCE_DBFS
