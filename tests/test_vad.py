"""EnergyVad and find_turns on synthetic signals and real espeak-ng speech."""

from __future__ import annotations

import numpy as np
import pytest
from support import RATE, espeak_pcm, silence, tone

from r2d2voice.audio.vad import (
    EnergyVad,
    SpeechStarted,
    SpeechStopped,
    Turn,
    find_turns,
    threshold_to_dbfs,
)


def noise(seconds: float, dbfs: float) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(round(seconds * RATE)) * 32768 * 10 ** (dbfs / 20)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def cat(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


def feed_chunks(vad: EnergyVad, pcm: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, len(pcm), chunk):
        events += vad.feed(pcm[i : i + chunk])
    return events


# --------------------------------------------------------------------------- basics


def test_threshold_mapping():
    assert threshold_to_dbfs(0.5) == pytest.approx(-40.0)
    assert threshold_to_dbfs(0.0) == pytest.approx(-70.0)
    assert threshold_to_dbfs(1.0) == pytest.approx(-10.0)
    with pytest.raises(ValueError):
        threshold_to_dbfs(1.5)
    with pytest.raises(ValueError):
        EnergyVad(threshold=-0.1)


def test_silence_and_low_noise_do_not_trigger():
    vad = EnergyVad()
    assert vad.feed(silence(3)) == []
    assert vad.feed(noise(3, -55)) == []
    assert not vad.speaking


def test_tone_burst_gives_one_turn_with_padding_and_silence_rule():
    pcm = cat(silence(0.5), tone(1.0), silence(1.0))
    events = EnergyVad().feed(pcm)
    assert events == [SpeechStarted(audio_start_ms=200, onset_ms=500), SpeechStopped(1500)]


def test_events_do_not_depend_on_chunking():
    pcm = cat(silence(0.37), tone(0.8, -25), silence(0.7), noise(0.9, -30), silence(0.6))
    whole = EnergyVad().feed(pcm)
    assert len(whole) == 4
    for chunk in (480, 137, 1, 24000):
        assert feed_chunks(EnergyVad(), pcm, chunk) == whole


def test_clicks_do_not_start_speech_but_60ms_does():
    clicks = cat(silence(0.3), tone(0.005, -6), silence(0.3), tone(0.04, -6), silence(0.6))
    assert EnergyVad().feed(clicks) == []
    burst = cat(silence(0.3), tone(0.07, -6), silence(0.6))
    events = EnergyVad().feed(burst)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert events[0].onset_ms == 300


def test_pause_shorter_than_silence_duration_keeps_the_turn():
    pcm = cat(silence(0.5), tone(0.5), silence(0.3), tone(0.5), silence(1.0))
    assert [type(e) for e in EnergyVad().feed(pcm)] == [SpeechStarted, SpeechStopped]
    two = EnergyVad(silence_duration_ms=200).feed(pcm)
    assert [type(e) for e in two] == [SpeechStarted, SpeechStopped] * 2
    assert two[1] == SpeechStopped(1000)


def test_a_blip_inside_the_pause_does_not_restart_it():
    pcm = cat(silence(0.5), tone(0.5), silence(0.25), tone(0.01, -6), silence(0.5))
    assert EnergyVad().feed(pcm) == [SpeechStarted(200, 500), SpeechStopped(1000)]


def test_threshold_sets_the_level_that_trips():
    quiet = cat(silence(0.3), tone(0.5, -45), silence(0.8))
    loud = cat(silence(0.3), tone(0.5, -35), silence(0.8))
    assert EnergyVad(threshold=0.5).feed(quiet) == []
    assert len(EnergyVad(threshold=0.3).feed(quiet)) == 2
    assert len(EnergyVad(threshold=0.5).feed(loud)) == 2
    assert EnergyVad(threshold=0.7).feed(loud) == []


def test_prefix_padding_is_clipped_at_zero_and_configurable():
    pcm = cat(silence(0.1), tone(0.5), silence(0.8))
    assert EnergyVad().feed(pcm)[0] == SpeechStarted(0, 100)
    assert EnergyVad(prefix_padding_ms=50).feed(pcm)[0] == SpeechStarted(50, 100)


def test_reset_restarts_the_clock_and_state():
    vad = EnergyVad()
    assert vad.feed(cat(silence(1.0), tone(0.3))) == [SpeechStarted(700, 1000)]
    assert vad.speaking
    vad.reset()
    assert not vad.speaking
    assert vad.feed(cat(silence(0.5), tone(0.3), silence(0.6))) == [
        SpeechStarted(200, 500),
        SpeechStopped(800),
    ]


def test_other_rates_and_bad_input():
    vad = EnergyVad(rate=16000)
    t = np.arange(16000) / 16000
    burst = np.round(3000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    pcm = cat(np.zeros(8000, np.int16), burst, np.zeros(16000, np.int16))
    assert vad.feed(pcm) == [SpeechStarted(200, 500), SpeechStopped(1500)]
    with pytest.raises(TypeError):
        EnergyVad().feed(np.zeros(480, np.float32))
    with pytest.raises(ValueError):
        EnergyVad().feed(np.zeros((480, 2), np.int16))
    with pytest.raises(ValueError):
        EnergyVad(rate=22050)


# --------------------------------------------------------------------------- find_turns


def test_find_turns_reports_start_end_and_close():
    pcm = cat(silence(0.5), tone(1.0), silence(1.0), tone(0.4), silence(0.7))
    turns = find_turns(pcm, RATE, silence_duration_ms=500)
    assert turns == [
        Turn(start_sample=12000, end_sample=36000, close_sample=48000),
        Turn(start_sample=60000, end_sample=69600, close_sample=81600),
    ]
    # close_sample is where a streaming VAD emits speech_stopped.
    vad = EnergyVad(silence_duration_ms=500)
    seen = 0
    for i in range(0, len(pcm), 480):
        for ev in vad.feed(pcm[i : i + 480]):
            if isinstance(ev, SpeechStopped):
                assert i + 480 == turns[seen].close_sample
                seen += 1
    assert seen == 2


def test_find_turns_uses_vad_params():
    pcm = cat(silence(0.5), tone(0.5), silence(0.3), tone(0.5), silence(1.0))
    assert len(find_turns(pcm)) == 1
    short = find_turns(pcm, silence_duration_ms=200)
    assert len(short) == 2
    assert short[0].close_sample - short[0].end_sample == 200 * RATE // 1000
    assert find_turns(pcm, threshold=0.9) == []


def test_find_turns_reports_a_turn_still_open_at_the_end():
    pcm = cat(silence(0.5), tone(0.5))
    assert find_turns(pcm) == [Turn(12000, 24000, 36000)]
    trailing = cat(silence(0.5), tone(0.5), silence(0.2))
    assert find_turns(trailing) == [Turn(12000, 24000, 36000)]


# --------------------------------------------------------------------------- real speech


def test_espeak_speech_is_one_turn_per_utterance(tmp_path):
    speech = espeak_pcm("Hello there. Is this thing on? Testing the voice detector.", tmp_path)
    level = 20 * np.log10(np.sqrt(np.mean(speech.astype(float) ** 2)) / 32768)
    assert -35 < level < -10  # espeak-ng at its normal level
    pcm = cat(silence(0.6), speech, silence(1.0), speech, silence(1.0))
    turns = find_turns(pcm)
    assert len(turns) == 2
    voiced = np.flatnonzero(np.abs(speech) > 300)
    first, last = voiced[0], voiced[-1]
    offset = len(silence(0.6))
    # Onset within 30 ms of the first loud sample, end within 150 ms of the last one.
    assert abs(turns[0].start_sample - (offset + first)) < 0.03 * RATE
    assert abs(turns[0].end_sample - (offset + last)) < 0.15 * RATE
    assert turns[1].start_sample - turns[0].start_sample == pytest.approx(
        len(speech) + RATE, abs=0.02 * RATE
    )


def test_espeak_speech_over_mic_noise(tmp_path):
    speech = espeak_pcm("Turn on the kitchen lights, please.", tmp_path)
    pcm = cat(silence(0.5), speech, silence(1.0))
    floor = noise(len(pcm) / RATE, -60)
    noisy = np.clip(pcm.astype(np.int32) + floor, -32768, 32767).astype(np.int16)
    events = EnergyVad().feed(noisy)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
