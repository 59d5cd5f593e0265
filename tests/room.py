"""A simulated room: the robot's little speaker a few centimetres from its microphone.

What reaches the microphone is the sum of

- the **echo**: what the robot played, through a small amplifier that clips softly
  (``tanh`` above ``CLIP_LEVEL``), then an impulse response with a direct path after
  ``DIRECT_MS`` (1.5 ms), a handful of early reflections (3-20 ms) and a reverberant tail of
  ``TAIL_S`` (0.3 s, decaying 60 dB over it), scaled by ``echo_gain``;
- a **person** talking at conversational level (about -30 dBFS median 20 ms frame, see
  :func:`person_at`);
- **fan noise** at ``FAN_DBFS`` (-55 dBFS RMS), brown-ish (most energy low, like a fan).

:class:`Room` does it offline on whole arrays; :class:`EchoPath` does the same echo block by
block (overlap-add FFT convolution) for a process that reads the speaker's monitor and plays
into the microphone on the PulseAudio rig. Levels are set relative to the person: ``echo_db``
is how much louder the echo's median frame is than the person's (:func:`echo_gain_for`).
Numpy only; deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIRECT_MS = 1.5
TAIL_S = 0.3
#: the amplifier's soft clipping starts around here (linear amplitude of digital full scale)
CLIP_LEVEL = 0.4
FAN_DBFS = -55.0
PERSON_DBFS = -30.0
#: the reverberant tail's energy relative to the direct path's (a speaker a few cm away)
TAIL_DB = -10.0


def frame_dbfs(x: np.ndarray, rate: int, ms: int = 20) -> np.ndarray:
    """RMS level of each ``ms`` frame, dBFS (int16 scaled by 1/32768, float as is)."""
    n = rate * ms // 1000
    f = np.asarray(x, dtype=np.float64)
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        f = f / 32768
    f = f[: len(f) // n * n].reshape(-1, n)
    return 20 * np.log10(np.sqrt(np.mean(f * f, axis=1)) + 1e-12)


def active_median_dbfs(x: np.ndarray, rate: int, floor: float = -60.0) -> float:
    """Median level of the 20 ms frames above ``floor`` (where something is said)."""
    levels = frame_dbfs(x, rate)
    active = levels[levels > floor]
    return float(np.median(active)) if len(active) else -120.0


def impulse_response(rate: int, seed: int = 1) -> np.ndarray:
    """Speaker -> microphone: direct path at 1.5 ms (gain 1), early reflections, 0.3 s tail."""
    rng = np.random.default_rng(seed)
    n = int(TAIL_S * rate) + int(DIRECT_MS * rate / 1000) + 1
    h = np.zeros(n)
    direct = round(DIRECT_MS * rate / 1000)
    h[direct] = 1.0
    for ms, gain in ((3.1, 0.45), (4.7, -0.3), (7.9, 0.25), (11.3, -0.18), (16.0, 0.12),
                     (19.4, -0.09)):
        h[direct + int(ms * rate / 1000)] += gain
    start = direct + int(0.005 * rate)
    t = np.arange(n - start) / rate
    tail = rng.standard_normal(n - start) * 10 ** (-3 * t / TAIL_S)  # -60 dB over TAIL_S
    tail *= np.sqrt(10 ** (TAIL_DB / 10) / np.sum(tail * tail))
    h[start:] += tail
    return h


def soft_clip(x: np.ndarray) -> np.ndarray:
    """A small amplifier: linear at normal levels, compressing smoothly near its rail."""
    return CLIP_LEVEL * np.tanh(np.asarray(x, dtype=np.float64) / CLIP_LEVEL)


def fan_noise(seconds: float, rate: int, seed: int = 2, dbfs: float = FAN_DBFS) -> np.ndarray:
    """Brown-ish noise (a fan's rumble and hiss) at ``dbfs`` RMS, float."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    hz = np.fft.rfftfreq(n, 1 / rate)
    spectrum /= np.sqrt(1 + hz / 200.0)  # -3 dB/octave above 200 Hz: pink-ish
    noise = np.fft.irfft(spectrum, n)
    return noise * (10 ** (dbfs / 20) / np.sqrt(np.mean(noise * noise)))


def to_float(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.float64) / 32768 if np.issubdtype(a.dtype, np.integer) else a.astype(
        np.float64)


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 32768), -32768, 32767).astype(np.int16)


def person_at(speech: np.ndarray, rate: int, dbfs: float = PERSON_DBFS) -> np.ndarray:
    """``speech`` scaled so that its median spoken 20 ms frame is at ``dbfs`` (float)."""
    x = to_float(speech)
    return x * 10 ** ((dbfs - active_median_dbfs(x, rate)) / 20)


def echo_gain_for(played: np.ndarray, rate: int, echo_db: float,
                  person_dbfs: float = PERSON_DBFS, seed: int = 1) -> float:
    """The speaker -> mic gain that puts ``played``'s echo ``echo_db`` above the person."""
    raw = np.convolve(soft_clip(to_float(played)), impulse_response(rate, seed))[: len(played)]
    return float(10 ** ((person_dbfs + echo_db - active_median_dbfs(raw, rate)) / 20))


@dataclass
class Room:
    """The whole room offline: ``mic(played, person)`` is what the microphone hears."""

    rate: int
    echo_gain: float
    seed: int = 1
    fan_dbfs: float = FAN_DBFS

    def echo(self, played: np.ndarray) -> np.ndarray:
        h = impulse_response(self.rate, self.seed) * self.echo_gain
        return np.convolve(soft_clip(to_float(played)), h)[: len(played)]

    def mic(self, played: np.ndarray, person: np.ndarray | None = None) -> np.ndarray:
        """int16 microphone signal as long as ``played``; ``person`` (float) is added from
        its start (pad it with zeros to place it)."""
        x = self.echo(played)
        if person is not None:
            n = min(len(x), len(person))
            x[:n] += person[:n]
        x += fan_noise(len(x) / self.rate, self.rate, self.seed + 1, self.fan_dbfs)[: len(x)]
        return to_int16(x)


class EchoPath:
    """The room's echo block by block (for a process between a speaker and a microphone):
    soft clipping, then the impulse response by overlap-add FFT convolution."""

    def __init__(self, rate: int, echo_gain: float, block: int, seed: int = 1) -> None:
        self.h = impulse_response(rate, seed) * echo_gain
        self.block = block
        self.nfft = 1 << int(np.ceil(np.log2(block + len(self.h))))
        self.H = np.fft.rfft(self.h, self.nfft)
        self.tail = np.zeros(self.nfft - block)

    def process(self, block: np.ndarray) -> np.ndarray:
        """The echo of the next ``block`` samples played (float in, float out)."""
        x = soft_clip(to_float(block))
        if len(x) != self.block:
            raise ValueError(f"blocks of {self.block} samples, got {len(x)}")
        y = np.fft.irfft(np.fft.rfft(x, self.nfft) * self.H, self.nfft)
        y[: len(self.tail)] += self.tail
        out = y[: self.block].copy()
        self.tail = y[self.block:].copy()
        return out


# -- the canceller in the room, offline, on a simulated clock --------------------------------


@dataclass
class Played:
    """What one simulated conversation did: the canceller's output and its input (24 kHz
    int16), what the speaker played (after the duck, at ``rate``), the person alone at the
    microphone (float at ``rate``) and the duck gain the playback used per 10 ms."""

    out: np.ndarray
    mic: np.ndarray
    speaker: np.ndarray
    person: np.ndarray
    duck: np.ndarray
    rate: int
    stopped_at: float | None = None


def simulate(canceller, reply: np.ndarray, *, rate: int, echo_gain: float,
             person: np.ndarray | None = None, person_at: float = 0.0,
             seconds: float | None = None, out_latency: float = 0.03,
             in_latency: float = 0.02, stop_on=None, seed: int = 1,
             idle_stop: float = 1.0, unreported: float = 0.0) -> Played:
    """Drive ``canceller`` (an :class:`~r2d2voice.audio.echo.EchoCanceller` and its tap) with
    the room, 10 ms at a time on a simulated clock, as the playback and capture callbacks
    would: ``reply`` (int16 at ``rate``) is played from t = 0 (the output stream closes
    ``idle_stop`` after it, as playback's does), its echo reaches the microphone
    after ``out_latency`` + the room's delay, the microphone's blocks reach the canceller
    ``in_latency`` after their ADC time, resampled to 24 kHz. ``person`` (float at ``rate``)
    starts talking at ``person_at`` s. ``stop_on(more_output) -> bool`` (given each new piece of
    output in turn) stands for the service interrupting the reply (the speaker stops 10 ms
    later). ``unreported``: a delay of the echo PortAudio's timing does not show (a sound
    server's buffers, a process in between)."""
    from types import SimpleNamespace

    from r2d2voice.audio.pcm import RATE, Resampler

    block = rate // 100
    seconds = seconds if seconds is not None else len(reply) / rate + 1.5
    steps = int(seconds * 100)
    lag = round((out_latency + unreported) * rate)
    path = EchoPath(rate, echo_gain, block, seed)
    total = steps * block + lag
    echo = np.zeros(total + block)
    alone = np.zeros(total + block)
    if person is not None:
        at = int(person_at * rate)
        n = max(0, min(len(person), total - at))
        alone[at:at + n] = person[:n]
    noise = fan_noise(total / rate + 0.1, rate, seed + 1)
    tap = canceller.tap
    tap.clock = lambda: now
    tap.device_opened()
    tap.start(rate, out_latency)
    canceller.reset()
    mic_resampler = Resampler(rate, RATE)
    outs: list[np.ndarray] = []
    mics: list[np.ndarray] = []
    speaker = np.zeros(steps * block, dtype=np.int16)
    ducks = np.zeros(steps)
    produced = 0
    stopped_at = None
    captured = 0  # physical samples handed to the canceller
    for k in range(steps):
        now = k / 100
        if tap.playing and k * block >= len(reply) + idle_stop * rate:
            tap.stop()
        piece = np.zeros((block, 2), dtype=np.int16)
        if stopped_at is None:
            src = reply[k * block:(k + 1) * block]
            piece[:len(src), 0] = src
            piece[:len(src), 1] = src
        tap.render(piece, SimpleNamespace(currentTime=now, outputBufferDacTime=now + out_latency))
        ducks[k] = tap._gain
        speaker[k * block:(k + 1) * block] = piece[:, 0]
        echo[k * block + lag:(k + 1) * block + lag] = path.process(piece[:, 0])
        ready = int((now - in_latency) * rate)  # what the ADC has delivered by now
        if ready - captured >= block:
            n = (ready - captured) // block * block
            mic = echo[captured:captured + n] + alone[captured:captured + n] + noise[
                captured:captured + n]
            pcm = mic_resampler.process(to_int16(mic))
            mics.append(pcm)
            outs.append(canceller.process(pcm, produced / RATE))
            produced += len(pcm)
            captured += n
            if stop_on is not None and stopped_at is None and stop_on(outs[-1]):
                stopped_at = now + 0.01
    return Played(np.concatenate(outs), np.concatenate(mics), speaker, alone, ducks, rate,
                  stopped_at)
