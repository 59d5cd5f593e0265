"""Wake-word detection on the board: microWakeWord models through pymicro-wakeword.

The detector takes the pipeline's 20 ms frames (24 kHz mono PCM16), resamples them to the 16 kHz
the models want, and reports a :class:`Wake` once per utterance: after a detection it ignores the
next ``refractory_s`` seconds *of audio* (counted in samples, not wall time, so a replay and a
live microphone behave alike). pymicro-wakeword is an optional extra (``r2d2voice[wake]``).

Silence is cheap: once the room has been quieter than ``silence_dbfs`` for ``SETTLE_SECONDS``
(longer than the model's memory, so its state is that of silence and more silence would leave
it so), frames skip the resampler, the features and the model. The last ``ONSET_SECONDS`` of
them are kept; the first louder frame runs them through first, so a word starting softly keeps
its onset.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r2d2voice.audio.pcm import RATE, Resampler, bytes_to_pcm16, rms_dbfs
from r2d2voice.errors import ConfigError

#: Models shipped inside pymicro-wakeword, by the name ``R2D2_WAKE_WORD`` takes.
BUNDLED = ("okay_nabu", "hey_jarvis", "hey_mycroft", "alexa")
MODEL_RATE = 16000
_CHUNK_BYTES = 160 * 2  # the frontend's 10 ms step at 16 kHz
#: Frames quieter than this (RMS) are silence to the detector.
SILENCE_DBFS = -60.0
#: Silence this long and the model has forgotten what came before: later silence is skipped.
SETTLE_SECONDS = 3.0
#: Skipped silence run through the model when sound comes back.
ONSET_SECONDS = 0.3


@dataclass(frozen=True)
class Wake:
    """A detection: the model's mean probability and where in the audio it fired."""

    wake_word: str
    score: float
    at_sample: int  # 24 kHz samples since the detector started


def _engine() -> Any:
    try:
        import pymicro_wakeword
    except ImportError:
        raise ConfigError(
            "wake-word listening needs pymicro-wakeword: pip install 'r2d2voice[wake]'"
        ) from None
    return pymicro_wakeword


def model_config(name_or_path: str) -> Path:
    """The .json of a bundled model name or of a custom microWakeWord model; ConfigError if
    neither (the message lists the bundled names)."""
    if name_or_path in BUNDLED:
        return Path(_engine().__file__).parent / "models" / f"{name_or_path}.json"
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            config = json.loads(path.read_text())
            if not (path.parent / config["model"]).is_file():
                raise ConfigError(f"wake-word model {path}: {config['model']} is missing")
            float(config["micro"]["probability_cutoff"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a microWakeWord model (.json)") from None
        return path
    raise ConfigError(
        f"unknown wake word {name_or_path!r}: use one of {', '.join(BUNDLED)} "
        "or the path of a microWakeWord model's .json"
    )


class WakeWordDetector:
    """Frames in, at most one :class:`Wake` per utterance out. Not thread-safe; no I/O."""

    def __init__(self, name_or_path: str, *, refractory_s: float = 2.0,
                 cutoff: float | None = None, silence_dbfs: float | None = SILENCE_DBFS
                 ) -> None:
        engine = _engine()
        self.config_path = model_config(name_or_path)
        self._model = engine.MicroWakeWord.from_config(self.config_path)
        self._features = engine.MicroWakeWordFeatures()
        self.wake_word: str = self._model.wake_word
        self.cutoff = self._model.probability_cutoff if cutoff is None else cutoff
        self.refractory_samples = round(refractory_s * RATE)
        self._resampler = Resampler(RATE, MODEL_RATE)
        self._pending = b""
        self._samples = 0
        self._quiet_until = 0
        self.best = 0.0  # highest probability seen since the last wake (for the log)
        #: None: every frame goes through the model
        self.silence_dbfs = silence_dbfs
        self._quiet = 0  # samples of silence in a row
        self._held: deque[tuple[np.ndarray, int]] = deque(maxlen=round(ONSET_SECONDS * 50))
        #: frames that skipped the model (silence), for statistics and tests
        self.skipped = 0

    def process(self, frame: bytes) -> Wake | None:
        """Feed one frame of 24 kHz PCM16; a Wake if the word ended in it."""
        pcm = bytes_to_pcm16(frame)
        self._samples += len(pcm)
        wake: Wake | None = None
        if self.silence_dbfs is not None:
            if rms_dbfs(pcm) < self.silence_dbfs:
                self._quiet += len(pcm)
                if self._quiet > SETTLE_SECONDS * RATE:
                    self._held.append((pcm, self._samples))
                    self.skipped += 1
                    return None
            else:
                self._quiet = 0
                while self._held:  # the onset the silence skip held back
                    wake = self._run(*self._held.popleft()) or wake
        return self._run(pcm, self._samples) or wake

    def _run(self, pcm16: np.ndarray, end: int) -> Wake | None:
        """Resampler, features and model for one frame ending at sample ``end``."""
        pcm = self._resampler.process(pcm16)
        self._pending += pcm.astype("<i2").tobytes()
        usable = len(self._pending) - len(self._pending) % _CHUNK_BYTES
        chunk, self._pending = self._pending[:usable], self._pending[usable:]
        wake: Wake | None = None
        for features in self._features.process_streaming(chunk):
            p = self._model.process_streaming_prob(features)
            if p is None:
                continue
            self.best = max(self.best, p)
            if p > self.cutoff and wake is None and end >= self._quiet_until:
                wake = Wake(self.wake_word, round(float(p), 3), end)
        if wake is not None:
            self._quiet_until = end + self.refractory_samples
            self.best = 0.0
        return wake

    def close(self) -> None:
        self._model.close()
