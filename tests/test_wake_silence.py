"""The wake-word detector skips long silence without changing what it hears (real models,
espeak-ng speech)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import espeak_pcm, silence, speech_frames, tone

from r2d2voice.audio import wake


def _run(pcm: np.ndarray, **kw: object) -> tuple[list[wake.Wake], int]:
    detector = wake.WakeWordDetector("hey_mycroft", **kw)
    found = [w for f in speech_frames(pcm) if (w := detector.process(f))]
    detector.close()
    return found, detector.skipped


@pytest.mark.parametrize("room", ["digital silence", "quiet hiss"])
def test_a_wake_after_long_silence_is_heard_as_without_the_skip(tmp_path: Path, room: str):
    said = espeak_pcm("hey mycroft, what time is it", tmp_path)
    quiet = silence(12.0) if room == "digital silence" else tone(12.0, dbfs=-75.0, freq=3000)
    pcm = np.concatenate([quiet, said, silence(1.0)])
    skipping, skipped = _run(pcm)
    every_frame, none_skipped = _run(pcm, silence_dbfs=None)
    # most of the 12 s (all but the settling time) skipped the model ...
    assert skipped >= (12.0 - wake.SETTLE_SECONDS - 0.5) * 50 and none_skipped == 0
    # ... and the wake is the same: once, with the same score, within one 20 ms frame (the
    # model runs every 30 ms of features: skipped frames can shift where that step falls)
    assert len(skipping) == 1 and len(every_frame) == 1
    assert abs(skipping[0].at_sample - every_frame[0].at_sample) <= 480
    assert skipping[0].score == pytest.approx(every_frame[0].score, abs=0.02)


def test_silence_between_two_requests_does_not_merge_them(tmp_path: Path):
    said = espeak_pcm("hey mycroft", tmp_path)
    pcm = np.concatenate([silence(0.5), said, silence(8.0), said, silence(1.0)])
    found, skipped = _run(pcm)
    assert len(found) == 2 and skipped > 0
