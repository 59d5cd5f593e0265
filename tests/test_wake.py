"""The on-board wake-word detector, on speech made by espeak-ng (no network, real models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import espeak_pcm, silence, speech_frames

from r2d2voice.audio import wake
from r2d2voice.errors import ConfigError


def detections(pcm: np.ndarray, **kw: object) -> list[object]:
    detector = wake.WakeWordDetector("hey_mycroft", **kw)
    found = [w for f in speech_frames(pcm) if (w := detector.process(f))]
    detector.close()
    return found


def test_hey_mycroft_wakes_once_with_its_score(tmp_path: Path) -> None:
    pcm = np.concatenate([silence(0.5), espeak_pcm("hey mycroft, what time is it", tmp_path),
                          silence(1.0)])
    found = detections(pcm)
    assert len(found) == 1
    (w,) = found
    assert w.wake_word == "Hey Mycroft" and w.score > 0.9
    # it fires after the word was said, not at the start of the file
    assert 0.5 * 24000 < w.at_sample < len(pcm)


def test_ordinary_speech_does_not_wake(tmp_path: Path) -> None:
    pcm = espeak_pcm("the weather today is nice and sunny, shall we go for a walk in the park",
                     tmp_path)
    assert detections(pcm) == []


def test_two_requests_wake_twice_but_one_utterance_wakes_once(tmp_path: Path) -> None:
    said = espeak_pcm("hey mycroft", tmp_path)
    twice = np.concatenate([silence(0.5), said, silence(3.0), said, silence(1.0)])
    assert len(detections(twice, refractory_s=2.0)) == 2
    # with a refractory period longer than the gap the second one is ignored
    assert len(detections(twice, refractory_s=10.0)) == 1


def test_unknown_model_is_a_config_error_listing_the_bundled_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        wake.WakeWordDetector("hey_r2")
    assert "hey_mycroft" in str(err.value) and "okay_nabu" in str(err.value)
    bogus = tmp_path / "mine.json"
    bogus.write_text("{}")
    with pytest.raises(ConfigError, match="not a microWakeWord model"):
        wake.WakeWordDetector(str(bogus))


def test_a_custom_model_is_loaded_from_its_json(tmp_path: Path) -> None:
    import json
    import shutil

    src = wake.model_config("hey_mycroft")
    shutil.copy(src.parent / "hey_mycroft.tflite", tmp_path / "r2.tflite")
    config = json.loads(src.read_text())
    config.update(model="r2.tflite", wake_word="Hey R2")
    (tmp_path / "r2.json").write_text(json.dumps(config))
    detector = wake.WakeWordDetector(str(tmp_path / "r2.json"))
    assert detector.wake_word == "Hey R2"
    detector.close()
