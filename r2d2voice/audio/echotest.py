"""``r2d2voice devices --echo-test``: how loud the robot's speaker is at its microphone.

Plays a chirp (a log sweep, twice, at the level of a reply at full volume) through the speaker
while recording the microphone in one duplex stream, then asks for a sentence at a normal
voice from about a metre away. It reports the speaker -> microphone delay (from the recording:
whatever the devices and the room add), how loud the echo is next to the voice, and how much
the echo canceller (WebRTC AEC3, as ``run`` uses it) removes of it, with a verdict in plain
words. The analysis (:func:`analyse`, :func:`verdict`) is numpy on arrays; only
:func:`run_echo_test` touches devices.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from r2d2voice.audio.pcm import RATE, Resampler, float_to_pcm16

__all__ = ["EchoReport", "analyse", "chirp", "run_echo_test", "verdict"]

#: a reply at full volume (a realtime voice's speech is around -18 dBFS RMS)
REPLY_DBFS = -18.0
CHIRP_SECONDS = 1.5
GAP_SECONDS = 0.25
TAIL_SECONDS = 0.6
VOICE_SECONDS = 4.0
#: assumed when no voice is heard: a person at a metre on a typical USB microphone
TYPICAL_VOICE_DBFS = -30.0
MAX_DELAY_S = 0.5


@dataclass(frozen=True)
class EchoReport:
    """What the echo test measured (levels: median 20 ms frame, dBFS)."""

    delay_ms: float
    echo_dbfs: float
    noise_dbfs: float
    voice_dbfs: float
    voice_measured: bool
    removed_db: float | None  # None: no canceller here

    @property
    def echo_over_voice_db(self) -> float:
        return self.echo_dbfs - self.voice_dbfs


def chirp(rate: int) -> np.ndarray:
    """Two log sweeps, 100 Hz to 8 kHz, at ``REPLY_DBFS`` RMS, a gap between, silence after."""
    n = int(CHIRP_SECONDS * rate)
    t = np.arange(n) / rate
    f0, f1 = 100.0, 8000.0
    k = math.log(f1 / f0)
    sweep = np.sin(2 * np.pi * f0 * CHIRP_SECONDS / k * (np.exp(t / CHIRP_SECONDS * k) - 1))
    fade = int(0.01 * rate)
    sweep[:fade] *= np.linspace(0, 1, fade)
    sweep[-fade:] *= np.linspace(1, 0, fade)
    sweep *= 10 ** (REPLY_DBFS / 20) * math.sqrt(2)
    gap, tail = np.zeros(int(GAP_SECONDS * rate)), np.zeros(int(TAIL_SECONDS * rate))
    return np.concatenate((sweep, gap, sweep, tail)).astype(np.float32)


def _frames_dbfs(x: np.ndarray, rate: int) -> np.ndarray:
    n = rate // 50
    f = np.asarray(x, dtype=np.float64)[: len(x) // n * n].reshape(-1, n)
    return 20 * np.log10(np.sqrt(np.mean(f * f, axis=1)) + 1e-12)


def _delay(played: np.ndarray, recorded: np.ndarray, rate: int) -> int:
    """Samples the recording lags what was played (GCC-PHAT: sharp even in a reverberant
    room)."""
    n = 1 << int(np.ceil(np.log2(len(played) + len(recorded))))
    cross = np.fft.rfft(recorded, n) * np.conj(np.fft.rfft(played, n))
    cross /= np.abs(cross) + 1e-12
    corr = np.fft.irfft(cross, n)[: int(MAX_DELAY_S * rate)]
    return int(np.argmax(corr))


def _removed(played: np.ndarray, recorded: np.ndarray, rate: int, delay: int) -> float | None:
    """dB the canceller removes from the second sweep's echo (the first one teaches it)."""
    from r2d2voice.audio.echo import load_apm

    make = load_apm()
    if make is None or rate % 100:
        return None
    from livekit.rtc import AudioFrame

    apm = make()
    mic = float_to_pcm16(Resampler(rate, RATE).process(recorded.astype(np.float32), last=True))
    ref = float_to_pcm16(played)
    # the reference taken 10 ms ahead of its echo, as run takes it
    shift = max(0, delay - rate // 100)
    ref = np.concatenate((ref[shift:], np.zeros(shift, dtype=np.int16)))
    out = np.zeros_like(mic)
    n, m = rate // 100, RATE // 100
    for i in range(min(len(ref) // n, len(mic) // m)):
        apm.process_reverse_stream(AudioFrame(bytearray(ref[i * n:(i + 1) * n].tobytes()),
                                              rate, 1, n))
        apm.set_stream_delay_ms(10)
        chunk = bytearray(mic[i * m:(i + 1) * m].tobytes())
        apm.process_stream(AudioFrame(chunk, RATE, 1, m))
        out[i * m:(i + 1) * m] = np.frombuffer(chunk, dtype=np.int16)
    second = slice(int((CHIRP_SECONDS + GAP_SECONDS) * 50), int((2 * CHIRP_SECONDS
                                                                  + GAP_SECONDS) * 50))
    before = _frames_dbfs(mic / 32768, RATE)[second]
    after = _frames_dbfs(out / 32768, RATE)[second]
    return float(np.median(before - after))


def analyse(played: np.ndarray, recorded: np.ndarray, rate: int, *,
            noise: np.ndarray, voice: np.ndarray | None, skew: float = 0.0) -> EchoReport:
    """The report for a ``played`` chirp and the microphone's ``recorded`` audio (float, same
    length and ``rate``), ``noise`` (the room before) and ``voice`` (a person speaking).
    ``skew``: seconds the played sound's first sample reached the DAC after the recording's
    first sample left the ADC (PortAudio's timing; it is not part of the room's delay)."""
    lag = _delay(played, recorded, rate)
    delay = max(0, lag - round(skew * rate))
    noise_dbfs = float(np.median(_frames_dbfs(noise, rate)))
    sweeps = _frames_dbfs(played, rate) > REPLY_DBFS - 20
    echo = _frames_dbfs(np.concatenate((recorded[lag:], np.zeros(lag))), rate)
    echo_dbfs = float(np.median(echo[sweeps]))
    voice_dbfs, measured = TYPICAL_VOICE_DBFS, False
    if voice is not None:
        levels = _frames_dbfs(voice, rate)
        spoken = levels[levels > noise_dbfs + 10]
        if len(spoken) >= 10:  # at least 0.2 s of speech
            voice_dbfs, measured = float(np.median(spoken)), True
    return EchoReport(delay * 1000 / rate, echo_dbfs, noise_dbfs, voice_dbfs, measured,
                      _removed(played, recorded, rate, lag))


def verdict(report: EchoReport) -> str:
    """What to do about it, in plain words."""
    over = report.echo_over_voice_db
    if report.removed_db is None:
        return ("no echo canceller here (pip install livekit): the robot runs half duplex and "
                "cannot be interrupted at a normal voice")
    if report.removed_db < 12:
        return (f"the canceller removes only {report.removed_db:.0f} dB: the speaker distorts "
                "or rattles; turn the volume down")
    if over > 13:
        return (f"your speaker is {over:.0f} dB louder at the mic than a voice: turn the volume "
                "down or move the mic")
    if over > 5:
        return (f"your speaker is {over:.0f} dB louder at the mic than a voice: conversations "
                "work; talking over the robot needs a clear voice (a lower volume helps)")
    return "good: the robot can hear you over its own voice"


def describe(report: EchoReport) -> list[str]:
    voice = ("measured" if report.voice_measured
             else "no voice heard: a typical voice at a metre assumed")
    lines = [
        f"speaker -> microphone delay: {report.delay_ms:.0f} ms",
        f"echo of a reply at full volume: {report.echo_dbfs:.0f} dBFS at the microphone",
        f"a voice at a metre: {report.voice_dbfs:.0f} dBFS ({voice})",
        f"the room's noise: {report.noise_dbfs:.0f} dBFS",
        f"the echo is {report.echo_over_voice_db:+.0f} dB against the voice",
    ]
    if report.removed_db is not None:
        lines.append(f"the echo canceller removes {report.removed_db:.0f} dB of it")
    lines.append(f"verdict: {verdict(report)}")
    return lines


def _play_and_record(sd: Any, played: np.ndarray, rate: int, mic: int, speaker: int
                     ) -> tuple[np.ndarray, float]:
    """Play ``played`` on ``speaker`` while recording as much from ``mic``, in two streams
    started together; the recording and the skew between them (PortAudio's DAC time of the
    first played sample minus the ADC time of the first recorded one)."""
    import threading

    recorded = np.zeros(len(played), dtype=np.float32)
    state = {"out": 0, "in": 0, "dac": None, "adc": None}
    done = threading.Event()

    def out_cb(outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        i = state["out"]
        if state["dac"] is None:
            state["dac"] = time.outputBufferDacTime
        piece = played[i:i + frames]
        outdata[:len(piece), 0] = piece
        outdata[len(piece):] = 0
        state["out"] = i + frames

    def in_cb(indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        i = state["in"]
        if state["adc"] is None:
            state["adc"] = time.inputBufferAdcTime
        n = max(0, min(frames, len(recorded) - i))
        recorded[i:i + n] = indata[:n, 0]
        state["in"] = i + frames
        if i + frames >= len(recorded):
            done.set()

    with sd.InputStream(device=mic, samplerate=rate, channels=1, dtype="float32",
                        callback=in_cb), \
            sd.OutputStream(device=speaker, samplerate=rate, channels=1, dtype="float32",
                            callback=out_cb):
        done.wait(timeout=len(recorded) / rate + 5)
    dac, adc = state["dac"], state["adc"]
    skew = float(dac - adc) if dac and adc else 0.0
    return recorded, skew


def run_echo_test(input_spec: str | None, output_spec: str | None) -> EchoReport:
    """Play the chirp on the output device, record the input device, then a voice; print the
    report on stdout (the prompts on stderr). Blocking; RuntimeFailure if a device is missing
    or cannot play and record at one rate."""
    import sounddevice as sd

    from r2d2voice.audio.devices import resolve_device
    from r2d2voice.errors import RuntimeFailure

    mic = resolve_device(input_spec, "input")  # a missing one: DeviceUnavailable, exit 1
    speaker = resolve_device(output_spec, "output")
    last: Exception | None = None
    for rate in dict.fromkeys((int(speaker.default_samplerate), 48000, 44100)):
        try:
            sd.check_input_settings(device=mic.index, samplerate=rate, channels=1)
            sd.check_output_settings(device=speaker.index, samplerate=rate, channels=1)
            break
        except Exception as exc:  # PortAudio's error for a rate a device refuses
            last = exc
    else:
        raise RuntimeFailure(f"{mic.describe()} and {speaker.describe()} share no sample rate: "
                             f"{last}")
    print("quiet please: listening to the room for a second ...", file=sys.stderr, flush=True)
    noise = sd.rec(rate, samplerate=rate, channels=1, device=mic.index, dtype="float32")
    sd.wait()
    print("playing a chirp through the speaker ...", file=sys.stderr, flush=True)
    played = np.concatenate((chirp(rate), np.zeros(rate // 2, dtype=np.float32)))
    recorded, skew = _play_and_record(sd, played, rate, mic.index, speaker.index)
    print(f"now say something at a normal voice from about a metre away "
          f"({VOICE_SECONDS:g} s) ...", file=sys.stderr, flush=True)
    voice = sd.rec(int(VOICE_SECONDS * rate), samplerate=rate, channels=1, device=mic.index,
                   dtype="float32")
    sd.wait()
    report = analyse(played, recorded, rate, noise=noise[:, 0], voice=voice[:, 0], skew=skew)
    print(f"echo test: {speaker.describe()} -> {mic.describe()} at {rate} Hz")
    for line in describe(report):
        print(line)
    return report
