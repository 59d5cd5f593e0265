"""Replay streams its input: a file is read, resampled and framed block by block, turns are found
as the frames go by, and a long recording is answered turn by turn from its first minute."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import soundfile as sf
from fake_service import FakeService, MemorySessions, NullSink, speech
from local_link import run_conversation

from r2d2voice.appliance.sources import FileSource, VadParams, _Frames
from r2d2voice.audio.files import AudioReader
from r2d2voice.audio.vad import find_turns
from r2d2voice.link.transport import Endpoint
from r2d2voice.realtime.client_events import SessionConfig

CFG = SessionConfig(instructions="x")
ENDPOINT = Endpoint("mem://fake", "m")


def write_wav(path: Path, pcm: np.ndarray, rate: int = 24000) -> Path:
    sf.write(path, pcm, rate, subtype="PCM_16")
    return path


async def frames_of(source: FileSource) -> list[bytes]:
    out = []
    async with _Frames(source) as frames:
        while (f := await frames.next()) is not None:
            out.append(f)
    return out


async def test_a_file_streams_the_same_frames_and_turns_as_the_whole_array(
        tmp_path: Path) -> None:
    pcm = speech(1.0, 0.8, 1.2, 0.8, 0.9)
    wav = write_wav(tmp_path / "talk.wav", pcm)
    streamed = FileSource(AudioReader(wav, block_frames=5000), realtime=False, vad=VadParams())
    whole = FileSource(pcm, realtime=False, vad=VadParams())
    a, b = await frames_of(streamed), await frames_of(whole)
    assert a == b and len(a) == round(streamed.seconds / 0.02)
    # the turns found on the fly are those of the whole padded recording
    padded = np.frombuffer(b"".join(b), dtype="<i2")
    assert streamed.turns == find_turns(padded, 24000) and len(streamed.turns) == 3


def long_wav(path: Path, minutes: float, every: int, rate: int = 16000) -> int:
    """A recording with ~1 s of speech every ``every`` seconds, written block by block."""
    import soxr

    turn = speech(1.0)
    turn16 = np.round(soxr.resample(turn.astype(np.float32) / 32768, 24000, rate) * 32767
                      ).astype(np.int16)
    turns = int(minutes * 60 // every)
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        for _ in range(turns):
            block = np.zeros(every * rate, np.int16)
            block[rate:rate + len(turn16)] = turn16
            out.write(block)
    return turns


async def test_a_long_file_is_held_one_block_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    turns = long_wav(path, minutes=20, every=120)
    reader = AudioReader(path, block_frames=16000)  # 1 s blocks of the 16 kHz file
    source = FileSource(reader, realtime=True, vad=VadParams())
    received = 0
    tracemalloc.start()
    try:
        async with _Frames(source) as frames:
            while await frames.next() is not None:
                received += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == round(source.seconds / 0.02)
    assert len(source.turns) == turns
    # 20 minutes at 24 kHz are 58 MB of PCM; about one decoded block is held at a time,
    # whatever the length (bench/long_replay.py measures peak RSS on a 10-hour file)
    assert peak < 4_000_000, f"{peak / 1e6:.1f} MB held while reading"


async def test_a_fast_replay_of_a_file_answers_each_turn(autojump_clock, tmp_path: Path) -> None:
    path = tmp_path / "talk.wav"
    turns = long_wav(path, minutes=3, every=60)
    sessions = MemorySessions()
    source = FileSource(AudioReader(path), realtime=False, vad=VadParams())
    await run_conversation(ENDPOINT, CFG, source, NullSink(), sessions, sessions.record,
                           connect=FakeService().connect)
    assert sessions.roles() == ["user", "assistant"] * turns


async def test_a_truncated_file_plays_what_it_has_and_says_so(tmp_path: Path) -> None:
    flac = tmp_path / "cut.flac"
    sf.write(flac, speech(1.0, 1.0, 1.0, 1.0), 24000, format="FLAC")
    data = flac.read_bytes()
    flac.write_bytes(data[: len(data) * 2 // 3])  # the header still claims the full length
    source = FileSource(AudioReader(flac, block_frames=4096), realtime=False, vad=VadParams())
    frames = await frames_of(source)
    assert 0 < len(frames) < round(source.seconds / 0.02)
    assert len(source.turns) >= 1 and source.truncated
