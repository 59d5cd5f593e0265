"""Deterministic R2-D2-style replies for the local backend (numpy only).

The local backend has no speech understanding, so it answers every turn with a short
burst of beeps, boops, whistles and warbles, and a transcript that says exactly that.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["PEAK_DBFS", "r2_reply"]

PEAK_DBFS = -12.0
"""Peak level of every reply."""

DISCLAIMER = "(R2 answers in beeps: local backend, no speech understanding)"

_FADE_S = 0.005
_MIN_SEGMENT_S = 0.04


def _rng(seed: bytes | int) -> np.random.Generator:
    if isinstance(seed, int):
        raw = seed.to_bytes((seed.bit_length() + 8) // 8 or 1, "little", signed=True)
    else:
        raw = bytes(seed)
    digest = hashlib.sha256(b"r2d2voice.beeps\0" + raw).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _tone(freq: np.ndarray, rate: int) -> np.ndarray:
    """A sine following the instantaneous frequency ``freq`` (Hz per sample)."""
    phase = 2 * np.pi * np.cumsum(freq) / rate
    return np.sin(phase)


def _segment(kind: str, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / rate
    if kind == "beep":
        freq = np.full(n, rng.uniform(1800, 3200))
    elif kind == "boop":
        freq = np.full(n, rng.uniform(450, 900))
    elif kind == "rising whistle":
        f0, f1 = rng.uniform(700, 1400), rng.uniform(2600, 4200)
        freq = f0 * (f1 / f0) ** (t / t[-1] if n > 1 else t)
    elif kind == "falling whistle":
        f0, f1 = rng.uniform(2600, 4200), rng.uniform(700, 1400)
        freq = f0 * (f1 / f0) ** (t / t[-1] if n > 1 else t)
    elif kind == "warble":
        centre, depth, speed = rng.uniform(1200, 2400), rng.uniform(200, 600), rng.uniform(12, 28)
        freq = centre + depth * np.sin(2 * np.pi * speed * t)
    else:  # trill: fast alternation of two notes
        low, high = rng.uniform(1000, 1600), rng.uniform(2000, 3000)
        step = int(rate * rng.uniform(0.025, 0.04))
        freq = np.where((np.arange(n) // max(step, 1)) % 2 == 0, low, high)
    wave = _tone(freq.astype(np.float64), rate)
    fade = min(int(_FADE_S * rate), n // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    return wave


_DURATIONS = {
    "beep": (0.06, 0.14),
    "boop": (0.08, 0.18),
    "rising whistle": (0.18, 0.40),
    "falling whistle": (0.18, 0.40),
    "warble": (0.20, 0.45),
    "trill": (0.15, 0.30),
}
_KINDS = tuple(_DURATIONS)


def _describe(kinds: list[str]) -> str:
    """Join runs of beeps/boops with hyphens: beep-boop-beep, rising whistle, warble."""
    words: list[str] = []
    for kind in kinds:
        if kind in ("beep", "boop") and words and words[-1].split("-")[-1] in ("beep", "boop"):
            words[-1] += "-" + kind
        else:
            words.append(kind)
    return ", ".join(words)


def r2_reply(seed: bytes | int, seconds: float = 1.0, rate: int = 24000) -> tuple[np.ndarray, str]:
    """R2-D2 beeps for ``seconds`` of mono PCM16 at ``rate``, and an honest transcript.

    Returns exactly ``round(seconds * rate)`` int16 samples peaking at :data:`PEAK_DBFS`,
    made of tones, chirps and warbles with 5 ms fades and short gaps, and a transcript such
    as ``"*beep-boop, rising whistle, warble* (R2 answers in beeps: local backend, no speech
    understanding)"``. The same ``seed`` always gives the same audio and text.
    """
    if seconds < 0 or rate <= 0:
        raise ValueError(f"need seconds >= 0 and rate > 0, got {seconds!r}, {rate!r}")
    rng = _rng(seed)
    total = round(seconds * rate)
    out = np.zeros(total, dtype=np.float64)
    kinds: list[str] = []
    pos = int(rate * rng.uniform(0.02, 0.06))
    min_len = int(_MIN_SEGMENT_S * rate)
    while total - pos >= min_len:
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        if kinds and kind == kinds[-1] and kind not in ("beep", "boop"):
            shift = 1 + int(rng.integers(len(_KINDS) - 1))
            kind = _KINDS[(_KINDS.index(kind) + shift) % len(_KINDS)]
        lo, hi = _DURATIONS[kind]
        n = min(int(rate * rng.uniform(lo, hi)), total - pos)
        out[pos : pos + n] = _segment(kind, n, rate, rng) * rng.uniform(0.6, 1.0)
        kinds.append(kind)
        pos += n + int(rate * rng.uniform(0.03, 0.09))
    peak = np.abs(out).max() if total else 0.0
    if peak > 0:
        out *= 32767 * 10 ** (PEAK_DBFS / 20) / peak
    audio = np.round(out).astype(np.int16)
    text = f"*{_describe(kinds)}* {DISCLAIMER}" if kinds else f"*silence* {DISCLAIMER}"
    return audio, text
