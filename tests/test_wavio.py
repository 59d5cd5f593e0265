"""Loading every kind of sound file as 24 kHz mono PCM16, refusing unusable ones, writing WAV."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import load_audio

from r2d2voice.audio.files import WavWriter
from r2d2voice.audio.pcm import RATE, float_to_pcm16, rms_dbfs
from r2d2voice.errors import EXIT_USAGE, UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
PCM_GUID = bytes.fromhex("0100000000001000800000aa00389b71")
SINE_DBFS = 20 * np.log10(0.5 / np.sqrt(2))  # a 0.5-amplitude sine: -9.03 dBFS


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def peak_hz(x: np.ndarray, rate: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def riff(fmt: bytes, data: bytes) -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(channels: int, rate: int, bits: int, tag: int = 1) -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)


def fmt_extensible(channels: int, rate: int, bits: int) -> bytes:
    mask = (1 << channels) - 1
    return fmt_chunk(channels, rate, bits, tag=0xFFFE) + struct.pack(
        "<HHI16s", 22, bits, mask, PCM_GUID
    )


def assert_sine(pcm: np.ndarray, seconds: float, freq: float, dbfs: float, tol: float) -> None:
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert abs(len(pcm) - seconds * RATE) <= 1
    assert peak_hz(pcm, RATE) == pytest.approx(freq, abs=2.0)
    assert rms_dbfs(pcm[1000:-1000]) == pytest.approx(dbfs, abs=tol)


@pytest.mark.parametrize(
    ("subtype", "tol"),
    [("PCM_U8", 0.2), ("PCM_16", 0.05), ("PCM_24", 0.05), ("PCM_32", 0.05), ("FLOAT", 0.05),
     ("DOUBLE", 0.05)],
)  # fmt: skip
def test_every_sample_format(tmp_path: Path, subtype: str, tol: float) -> None:
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, sine(440.0, 16000, 1.5), 16000, subtype=subtype, format="WAV")
    assert sf.info(path).subtype == subtype
    assert_sine(load_audio(path), 1.5, 440.0, SINE_DBFS, tol)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000, 96000])
def test_any_rate(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, sine(1000.0, rate, 2.0), rate, subtype="PCM_16")
    assert_sine(load_audio(path), 2.0, 1000.0, SINE_DBFS, 0.05)


def test_24k_mono_pcm16_is_loaded_bit_exact(tmp_path: Path) -> None:
    x = float_to_pcm16(sine(300.0, RATE, 0.3))
    path = tmp_path / "exact.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(x.tobytes())
    assert np.array_equal(load_audio(path), x)


def test_stereo_44k1_is_averaged(tmp_path: Path) -> None:
    left, right = sine(440.0, 44100, 1.0, amp=0.6), sine(440.0, 44100, 1.0, amp=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    # The mean of the two in-phase channels is a 0.4-amplitude sine.
    assert_sine(load_audio(path), 1.0, 440.0, 20 * np.log10(0.4 / np.sqrt(2)), 0.05)


def test_opposite_channels_cancel(tmp_path: Path) -> None:
    s = sine(440.0, 48000, 0.5)
    path = tmp_path / "cancel.wav"
    sf.write(path, np.stack([s, -s], axis=1), 48000, subtype="FLOAT")
    assert rms_dbfs(load_audio(path)) < -90


def test_many_channels_extensible_written_by_libsndfile(tmp_path: Path) -> None:
    path = tmp_path / "six.wav"
    data = np.zeros((48000, 6))
    data[:, 2] = sine(700.0, 48000, 1.0, amp=0.6)  # one loud channel among six
    sf.write(path, data, 48000, subtype="PCM_24", format="WAVEX")
    assert struct.unpack("<H", path.read_bytes()[20:22])[0] == 0xFFFE
    assert_sine(load_audio(path), 1.0, 700.0, 20 * np.log10(0.1 / np.sqrt(2)), 0.05)


@pytest.mark.parametrize(("channels", "bits"), [(1, 16), (2, 24), (1, 32)])
def test_hand_built_extensible_header(tmp_path: Path, channels: int, bits: int) -> None:
    x = np.round(sine(523.0, 22050, 1.0) * (2 ** (bits - 1) - 1)).astype(np.int64)
    frames = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    width = bits // 8
    raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in frames)
    path = tmp_path / "ext.wav"
    path.write_bytes(riff(fmt_extensible(channels, 22050, bits), raw))
    assert_sine(load_audio(path), 1.0, 523.0, SINE_DBFS, 0.05)


def test_hand_built_8bit_unsigned(tmp_path: Path) -> None:
    raw = np.round(sine(440.0, 8000, 1.0) * 127 + 128).astype(np.uint8).tobytes()
    path = tmp_path / "u8.wav"
    path.write_bytes(riff(fmt_chunk(1, 8000, 8), raw))
    assert_sine(load_audio(path), 1.0, 440.0, SINE_DBFS, 0.2)


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_other_formats_libsndfile_reads(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = tmp_path / f"s.{fmt.lower()}"
    sf.write(path, sine(440.0, 44100, 1.0), 44100, format=fmt, subtype=subtype)
    assert_sine(load_audio(path), 1.0, 440.0, SINE_DBFS, 0.2)


def test_committed_samples_are_speech_with_leading_silence() -> None:
    for name in ("hello.wav", "question.wav", "two_turns.wav"):
        info = sf.info(SAMPLES / name)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        pcm = load_audio(SAMPLES / name)
        assert len(pcm) == pytest.approx(info.duration * RATE, abs=1)
        assert 1.5 < len(pcm) / RATE < 8
        assert rms_dbfs(pcm[: RATE // 4]) < -60  # silent start
        assert rms_dbfs(pcm) > -30  # there is speech
    # two_turns has a pause of more than a second between its turns.
    pcm = load_audio(SAMPLES / "two_turns.wav")
    frame = RATE // 50
    levels = [rms_dbfs(pcm[i : i + frame]) for i in range(0, len(pcm) - frame, frame)]
    longest = run = 0
    for level in levels[len(levels) // 5 : -len(levels) // 5]:
        run = run + 1 if level < -50 else 0
        longest = max(longest, run)
    assert longest * 0.02 > 1.2


# -- unusable input ------------------------------------------------------------------------


def assert_usage_error(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and message.strip() == message
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.__cause__ is None  # no soundfile/OS exception chained into a traceback
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in assert_usage_error(tmp_path / "nope.wav")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in assert_usage_error(tmp_path)


def test_text_file_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("these are not the droids\nyou are looking for\n")
    assert "not a readable audio file" in assert_usage_error(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    assert_usage_error(path)


def test_empty_wav_with_zero_frames(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    assert "0 frames" in assert_usage_error(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    sf.write(path, sine(440.0, 16000, 0.5), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:30])
    assert_usage_error(path)


def test_zero_channels(tmp_path: Path) -> None:
    path = tmp_path / "nochan.wav"
    path.write_bytes(riff(struct.pack("<HHIIHH", 1, 0, 16000, 0, 0, 16), b"\x00" * 100))
    assert_usage_error(path)


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "pipe.wav"
    os.mkfifo(path)
    assert "not a regular file" in assert_usage_error(path)


def test_float_file_with_nan_and_inf_loads(tmp_path: Path) -> None:
    x = sine(440.0, RATE, 1.0)
    x[1000:1010] = np.nan
    x[5000] = np.inf
    x[6000] = -1e30
    path = tmp_path / "nan.wav"
    sf.write(path, x, RATE, subtype="FLOAT")
    pcm = load_audio(path)
    assert len(pcm) == RATE
    assert rms_dbfs(pcm[12000:]) == pytest.approx(SINE_DBFS, abs=0.05)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_16"), ("WAVEX", "PCM_24"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"),
     ("WAV", "PCM_U8")],
)  # fmt: skip
def test_corrupted_files_never_escape_as_other_errors(
    tmp_path: Path, fmt: str, subtype: str, capfd: pytest.CaptureFixture[str]
) -> None:
    buf = io.BytesIO()
    sf.write(buf, sine(440.0, 8000, 0.5), 8000, format=fmt, subtype=subtype)
    good = buf.getvalue()
    rng = np.random.default_rng(7)
    path = tmp_path / "bad.wav"
    refused = 0
    for i in range(200):
        data = bytearray(good)
        if i % 2:
            data = data[: rng.integers(0, len(data))]
        else:
            for _ in range(rng.integers(1, 6)):
                data[rng.integers(0, 64)] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            pcm = load_audio(path)
        except UsageError as exc:
            refused += 1
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert refused > 0
    assert "Traceback" not in capfd.readouterr().err  # nothing printed by cffi callbacks


def test_path_with_newline_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "two\nlines.wav"
    with pytest.raises(UsageError) as info:
        load_audio(path)
    assert "\n" not in str(info.value) and "lines.wav" in str(info.value)


def test_unreadable_permissions(tmp_path: Path) -> None:
    path = tmp_path / "secret.wav"
    sf.write(path, sine(440.0, 16000, 0.5), 16000)
    path.chmod(0)
    if os.geteuid() != 0:
        assert "permission denied" in assert_usage_error(path)
        return
    # root reads any file: check in a child without the capabilities that let it (setpriv)
    code = ("import sys\nfrom r2d2voice.audio.files import AudioReader\n"
            "from r2d2voice.errors import UsageError\n"
            "try:\n    AudioReader(sys.argv[1])\nexcept UsageError as e:\n    print(e)\n")
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                        sys.executable, "-c", code, str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    message = r.stdout.strip()
    assert "permission denied" in message and "secret.wav" in message
    assert "\n" not in message


# -- WavWriter -----------------------------------------------------------------------------


def read_wav(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    with wave.open(str(path), "rb") as w:
        params = (w.getnchannels(), w.getsampwidth(), w.getframerate())
        return params, np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_writer_writes_incrementally(tmp_path: Path) -> None:
    x = float_to_pcm16(sine(440.0, RATE, 1.0))
    path = tmp_path / "reply.wav"
    with WavWriter(path) as writer:
        for i in range(0, len(x), 1234):
            writer.write(x[i : i + 1234])
        writer.write(x[:0])
        writer.write(x[:480].tobytes())  # little-endian PCM16 bytes are accepted too
        assert writer.frames_written == len(x) + 480
    assert writer.closed
    params, data = read_wav(path)
    assert params == (1, 2, RATE)
    assert np.array_equal(data, np.concatenate([x, x[:480]]))
    assert np.array_equal(load_audio(path), data)
    writer.close()  # idempotent


def test_writer_with_nothing_written_is_a_valid_wav(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    writer = WavWriter(path)
    writer.close()
    params, data = read_wav(path)
    assert params == (1, 2, RATE) and len(data) == 0
    assert sf.info(path).frames == 0


def test_writer_rejects_wrong_audio_and_use_after_close(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "x.wav")
    with pytest.raises(ValueError):
        writer.write(np.zeros(10, dtype=np.float32))
    writer.close()
    with pytest.raises(ValueError):
        writer.write(np.zeros(10, dtype=np.int16))


@pytest.mark.parametrize("where", ["missing_dir", "directory", "file_as_dir"])
def test_writer_unusable_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    path = {
        "missing_dir": tmp_path / "no" / "such" / "out.wav",
        "directory": tmp_path,
        "file_as_dir": tmp_path / "file" / "out.wav",
    }[where]
    with pytest.raises(UsageError) as info:
        WavWriter(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert info.value.__cause__ is None


def test_writer_puts_the_file_in_place_at_close(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    path.write_bytes(b"an older reply")
    writer = WavWriter(path)
    writer.write(np.ones(480, np.int16))
    assert path.read_bytes() == b"an older reply"  # a reader never sees half a file
    writer.close()
    assert read_wav(path)[1].tolist() == [1] * 480
    assert path.stat().st_mode & 0o777 == 0o600
    kept = WavWriter(path, keep_existing=True)  # nothing written: the file stays
    kept.close()
    assert kept.kept_existing and read_wav(path)[1].tolist() == [1] * 480
    new = WavWriter(tmp_path / "new.wav", keep_existing=True)  # nothing there: an empty WAV
    new.close()
    assert not new.kept_existing and len(read_wav(tmp_path / "new.wav")[1]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.wav", "reply.wav"]
