"""The echo canceller stage (audio/echo.py, audio/doubletalk.py) in a simulated room.

``tests/room.py`` is the room: the speaker 1.5 ms from the microphone, early reflections, a
0.3 s reverberant tail, a small amplifier's soft clipping, a fan at -55 dBFS, a person at a
normal voice (-30 dBFS median frame, another espeak-ng voice than the robot's). The canceller
runs exactly as in ``run`` — the speaker's tap in the output callback, the canceller on the
microphone's 24 kHz audio — on a simulated clock with the output's and input's latencies. The
service is stood for by the local backend's VAD (``EnergyVad`` with the default server_vad
parameters): what it would take for speech is what the service would hear.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soxr
from room import echo_gain_for, frame_dbfs, person_at, simulate, to_int16
from support import espeak_pcm

from r2d2voice.audio import echo as echo_module
from r2d2voice.audio.beeps import r2_reply
from r2d2voice.audio.echo import EchoCanceller, SpeakerTap, echo_stage, load_apm, resolve_mode
from r2d2voice.audio.pcm import RATE
from r2d2voice.audio.vad import EnergyVad, SpeechStarted

ROBOT_SAYS = ("Hello there, I am R2. I can hear you quite well, and the weather today is "
              "sunny with a light breeze from the west.")
PERSON_SAYS = "What time is it? Could you please tell me the time now."
PERSON_VOICE = ("-v", "en+f3", "-p", "70")
PERSON_AT = 1.0


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("voices")
    robot = espeak_pcm(ROBOT_SAYS, tmp, rate=48000).astype(np.float64)
    robot = to_int16(robot / np.abs(robot).max() * 0.7)  # a TTS voice near full scale
    beeps, _ = r2_reply(b"echo-test", 4.0)
    beeps48 = to_int16(soxr.resample(beeps.astype(np.float32) / 32768, RATE, 48000))
    person = espeak_pcm(PERSON_SAYS, tmp, rate=48000, voice=PERSON_VOICE)
    return {"speech": robot, "beeps": beeps48, "person": person_at(person, 48000)}


def canceller() -> EchoCanceller:
    make = load_apm()
    assert make is not None, "livekit is a dependency on this platform"
    return EchoCanceller(make, SpeakerTap())


def service_vad() -> EnergyVad:
    """The service's VAD: server_vad defaults, as the local backend runs them."""
    return EnergyVad(RATE, threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)


def speech_starts(out: np.ndarray) -> list[float]:
    """Where the service's VAD starts a turn in ``out``, s."""
    return [e.onset_ms / 1000 for e in service_vad().feed(out)
            if isinstance(e, SpeechStarted)]


@pytest.mark.parametrize("rate", [48000, 44100])
def test_the_echo_is_removed_once_the_canceller_has_converged(voices, rate):
    reply = voices["speech"] if rate == 48000 else to_int16(
        soxr.resample(voices["speech"].astype(np.float32) / 32768, 48000, rate))
    played = simulate(canceller(), reply, rate=rate, echo_gain=echo_gain_for(reply, rate, 5))
    converged = slice(100, len(reply) * 50 // rate)  # from 2 s to the reply's end (20 ms frames)
    mic, out = frame_dbfs(played.mic, RATE)[converged], frame_dbfs(played.out, RATE)[converged]
    speaking = mic > -45
    assert speaking.mean() > 0.5
    reduction = np.median(mic[speaking] - out[speaking])
    assert reduction >= 25.0, f"echo reduced by {reduction:.1f} dB only"
    assert out.max() < -45.0  # what is left is at the fan's level, not a voice


@pytest.mark.parametrize("kind", ["speech", "beeps"])
@pytest.mark.parametrize("echo_db", [-10, 5, 13])
def test_the_robot_never_hears_itself(voices, kind, echo_db):
    reply = voices[kind]
    stage = canceller()
    played = simulate(stage, reply, rate=48000, echo_gain=echo_gain_for(reply, 48000, echo_db))
    assert speech_starts(played.mic), "the room must be loud enough to trigger the VAD"
    assert speech_starts(played.out) == []
    assert (played.duck == 1.0).mean() > 0.9  # the reply played at its volume


@pytest.mark.parametrize(("kind", "echo_db", "within"), [
    ("speech", 5, 0.8), ("speech", 13, 1.5), ("beeps", 5, 0.8), ("beeps", 13, 1.5)])
def test_a_person_talking_over_the_reply_is_heard(voices, kind, echo_db, within):
    reply, person = voices[kind], voices["person"]
    stage = canceller()
    gain = echo_gain_for(reply, 48000, echo_db)

    vad, fed = service_vad(), [0]

    def service_hears(more: np.ndarray) -> bool:
        """The service's VAD on what it was sent since the person started talking."""
        start = max(0, int(PERSON_AT * RATE) - fed[0])
        fed[0] += len(more)
        return any(isinstance(e, SpeechStarted) for e in vad.feed(more[start:]))

    played = simulate(stage, reply, rate=48000, echo_gain=gain, person=person,
                      person_at=PERSON_AT, stop_on=service_hears)
    assert played.stopped_at is not None, "the person was never heard"
    assert played.stopped_at - PERSON_AT <= within
    assert stage.doubletalk.stats.ducks >= 1
    # what they said reaches the service at about their level (not suppressed with the echo)
    after = slice(int((played.stopped_at + 0.2) * 50), None)
    alone = frame_dbfs(soxr.resample(played.person, 48000, RATE), RATE)[after]
    out = frame_dbfs(played.out, RATE)[after]
    alone, out = alone[:len(out)], out[:len(alone)]
    spoken = alone > -40
    assert np.median(out[spoken] - alone[spoken]) > -6.0


def test_a_cough_ducks_the_reply_for_a_moment_and_it_comes_back(voices):
    reply = voices["speech"]
    rng = np.random.default_rng(3)
    cough = np.zeros(int(0.15 * 48000))
    cough[:] = rng.standard_normal(len(cough)) * 10 ** (-15 / 20) * np.hanning(len(cough))
    stage = canceller()
    played = simulate(stage, reply, rate=48000, echo_gain=echo_gain_for(reply, 48000, 5),
                      person=cough, person_at=2.0)
    stats = stage.doubletalk.stats
    assert stats.ducks >= 1 and stats.recoveries >= 1
    ducked = np.flatnonzero(played.duck < 0.5) / 100
    assert ducked.min() >= 2.0 and ducked.max() < 3.0  # ducked after the cough, for < 1 s
    assert played.duck[300:int(len(reply) / 480)].min() == pytest.approx(1.0)  # back up


def test_the_canceller_rests_when_nothing_has_played_for_a_while(voices):
    reply = voices["speech"][: 48000]  # one second of speech
    stage = canceller()
    played = simulate(stage, reply, rate=48000, echo_gain=echo_gain_for(reply, 48000, 5),
                      seconds=4.0)
    chunks = stage.stats.chunks
    assert stage.stats.rests == 1 and not stage.active
    assert chunks < 3.0 * 100  # the module ran for the reply and its tail, not the rest
    tail = slice(int(3.0 * RATE), len(played.out))
    assert np.array_equal(played.out[tail], played.mic[tail])  # untouched once resting
    stage.tap.device_opened()  # a speaker reopened after going away: another echo path
    simulate(stage, reply, rate=48000, echo_gain=echo_gain_for(reply, 48000, 5), seconds=1.5)
    assert stage.stats.resets >= 1


def test_the_reference_is_what_the_speaker_played_when_it_played():
    from types import SimpleNamespace

    now = 10.0
    tap = SpeakerTap(clock=lambda: now)
    tap.start(48000, 0.03)
    block = np.arange(480, dtype=np.int16)[:, np.newaxis].repeat(2, axis=1)
    tap.render(block, SimpleNamespace(currentTime=500.0, outputBufferDacTime=500.025))
    assert tap.timeline.time_of(0) == pytest.approx(10.025)  # PortAudio's own clock mapped
    assert tap.timeline.index_at(10.025 + 0.005) == pytest.approx(240)
    out = np.empty(480, dtype=np.int16)
    tap.read(240, 480, out)
    assert np.array_equal(out[:240], np.arange(240, 480)) and not out[240:].any()
    tap.render(block, SimpleNamespace(currentTime=0.0, outputBufferDacTime=0.0))
    assert tap.timeline.time_of(480) == pytest.approx(10.03, abs=0.006)  # no timing: latency


def test_without_livekit_aec_warns_once_and_is_half_duplex(monkeypatch, caplog):
    monkeypatch.setattr(echo_module, "load_apm", lambda: None)
    monkeypatch.setattr(echo_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="r2d2voice.audio.echo"):
        assert resolve_mode("aec") == "half"
        assert echo_stage("aec") is None
    assert resolve_mode("off") == "off" and resolve_mode("half") == "half"
    warnings = [r for r in caplog.records if "no echo canceller" in r.getMessage()]
    assert len(warnings) == 1
