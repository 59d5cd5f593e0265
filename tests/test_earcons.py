"""Earcons: a rising chirp, a falling whistle and the sad beep, short, soft and always the
same; the reply WAV of a replay never contains them (the speaker gets them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from support import load_audio

from r2d2voice.appliance.sinks import WavSink
from r2d2voice.audio import earcons
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

RATE = 24000


def pitch(pcm: np.ndarray) -> float:
    """The strongest frequency in ``pcm`` (Hz)."""
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / RATE)[spectrum.argmax()])


def at(pcm: np.ndarray, start: float, seconds: float = 0.03) -> float:
    return pitch(pcm[round(start * RATE):round((start + seconds) * RATE)])


def test_the_chirp_rises_and_the_whistle_falls() -> None:
    chirp, whistle = earcons.chirp(), earcons.whistle()
    # chirp: a 60 ms beep, 30 ms apart, then a 160 ms rising whistle
    assert at(chirp, 0.10) < at(chirp, 0.21) - 1000
    # whistle: a 280 ms falling whistle, then a boop (low)
    assert at(whistle, 0.0) > at(whistle, 0.24) + 1000
    assert at(whistle, 0.32) < 1000


def test_the_sad_beep_is_two_low_notes_sliding_down() -> None:
    sad = earcons.sad()
    first, second = at(sad, 0.02, 0.09), at(sad, 0.2, 0.15)
    assert 550 < first < 700 and 350 < second < 520 and second < first - 100
    assert at(sad, 0.17, 0.06) > at(sad, 0.33, 0.06) + 50  # the second note slides down
    # lower than any note of the chirp or the whistle's start: it does not sound like either
    assert first < at(earcons.chirp(), 0.0) and first < at(earcons.whistle(), 0.0)


def test_earcons_are_short_soft_and_always_the_same() -> None:
    for make, longest in ((earcons.chirp, 0.3), (earcons.whistle, 0.45), (earcons.sad, 0.45)):
        pcm = make()
        assert pcm.dtype == np.int16 and 0.2 < len(pcm) / RATE <= longest
        peak_dbfs = 20 * np.log10(np.abs(pcm.astype(np.int32)).max() / 32768)
        assert peak_dbfs == pytest.approx(earcons.EARCON_DBFS, abs=0.1)
        assert np.array_equal(pcm, make())
    assert not np.array_equal(earcons.chirp()[:4800], earcons.whistle()[:4800])


def test_earcon_items_are_told_apart_from_replies() -> None:
    chunk = earcons.earcon_chunk("chirp-1", earcons.chirp())
    assert earcons.is_earcon(chunk.item_id) and not earcons.is_earcon("item_abc123")


@pytest.mark.parametrize("realtime", [False, True])
async def test_the_reply_wav_skips_earcons(autojump_clock, tmp_path: Path,
                                           realtime: bool) -> None:
    reply = (np.arange(RATE // 2) % 200 - 100).astype(np.int16) * 50
    sink = WavSink(str(tmp_path / "reply.wav"), realtime=realtime)
    buffer = PlayoutBuffer(clock=trio.current_time)
    send, receive = trio.open_memory_channel[AudioChunk](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run, receive, buffer)
        async with send:
            await send.send(earcons.earcon_chunk("chirp-1", earcons.chirp()))
            await send.send(AudioChunk("item_1", reply))
            await send.send(earcons.earcon_chunk("whistle-2", earcons.whistle()))
    assert sink.earcons_skipped == 2
    assert np.array_equal(load_audio(tmp_path / "reply.wav"), reply)
