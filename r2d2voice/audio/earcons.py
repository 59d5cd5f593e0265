"""Earcons: the robot's short sounds for "I'm listening", "I've stopped listening" and "I can't".

Made by the beep synthesizer (:mod:`r2d2voice.audio.beeps`): a rising chirp when a conversation
starts (a beep, then a rising whistle), a falling whistle when it ends (the whistle, then a
boop), and a sad beep when it cannot start (the budget is spent: two low notes sliding down).
Each is the same every time. They reach the speaker as playout items whose id starts with
:data:`EARCON_PREFIX`: a sink that records reply audio (``replay``'s WAV file) skips those, and
they never enter the microphone path, so the service is never sent one.
"""

from __future__ import annotations

import numpy as np

from r2d2voice.audio.beeps import _rng, _segment, _tone
from r2d2voice.audio.pcm import RATE
from r2d2voice.audio.playout import AudioChunk

__all__ = ["EARCON_DBFS", "EARCON_PREFIX", "chirp", "earcon_chunk", "is_earcon", "sad",
           "whistle"]

#: Item ids of earcons in the playout buffer start with this (reply items never do).
EARCON_PREFIX = "earcon:"
#: Peak level: softer than a reply (-12 dBFS), they are cues, not speech.
EARCON_DBFS = -18.0

_GAP_S = 0.03
#: (kind, seconds) of each part, in order
_CHIRP = (("beep", 0.06), ("rising whistle", 0.16))
_WHISTLE = (("falling whistle", 0.28), ("boop", 0.09))
#: (start Hz, end Hz, seconds) of the sad beep's two notes: a fourth apart, each sliding down
_SAD = ((660.0, 600.0, 0.13), (500.0, 370.0, 0.24))
_FADE_S = 0.01


def _render(parts: tuple[tuple[str, float], ...], seed: int, rate: int) -> np.ndarray:
    rng = _rng(seed)
    gap = np.zeros(round(_GAP_S * rate))
    pieces: list[np.ndarray] = []
    for kind, seconds in parts:
        if pieces:
            pieces.append(gap)
        pieces.append(_segment(kind, round(seconds * rate), rate, rng))
    wave = np.concatenate(pieces)
    wave *= 32767 * 10 ** (EARCON_DBFS / 20) / np.abs(wave).max()
    return np.round(wave).astype(np.int16)


def chirp(rate: int = RATE) -> np.ndarray:
    """The wake earcon (about 0.25 s of int16 mono): a beep and a rising whistle."""
    return _render(_CHIRP, 0xC41, rate)


def whistle(rate: int = RATE) -> np.ndarray:
    """The closing earcon (about 0.4 s of int16 mono): a falling whistle and a boop."""
    return _render(_WHISTLE, 0x5EE, rate)


def sad(rate: int = RATE) -> np.ndarray:
    """The "I can't" earcon (about 0.4 s of int16 mono): two low notes sliding down."""
    pieces: list[np.ndarray] = []
    fade = round(_FADE_S * rate)
    for f0, f1, seconds in _SAD:
        if pieces:
            pieces.append(np.zeros(round(_GAP_S * rate)))
        n = round(seconds * rate)
        note = _tone(np.geomspace(f0, f1, n), rate)
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        note[:fade] *= ramp
        note[n - fade:] *= ramp[::-1]
        pieces.append(note)
    wave = np.concatenate(pieces)
    wave *= 32767 * 10 ** (EARCON_DBFS / 20) / np.abs(wave).max()
    return np.round(wave).astype(np.int16)


def is_earcon(item_id: str) -> bool:
    """The playout item is an earcon, not reply audio."""
    return item_id.startswith(EARCON_PREFIX)


def earcon_chunk(name: str, pcm: np.ndarray) -> AudioChunk:
    """``pcm`` as a playout chunk of its own earcon item (``earcon:<name>``); ``name`` should
    differ from one earcon to the next (the buffer tracks played samples per item)."""
    return AudioChunk(EARCON_PREFIX + name, pcm)
