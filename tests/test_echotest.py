"""``r2d2voice devices --echo-test``: its analysis on the simulated room, and the command on
the PulseAudio rig with the room between the speaker and the microphone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from room import Room, echo_gain_for, fan_noise, person_at, to_float
from support import SCRUBBED_PREFIXES, espeak_pcm
from test_echo import PERSON_VOICE, room

from r2d2voice.audio.echotest import analyse, chirp, verdict

RATE = 48000


@pytest.mark.parametrize("echo_db", [0, 18])
def test_the_analysis_finds_the_delay_the_echo_against_a_voice_and_what_is_removed(
        tmp_path, echo_db):
    played = chirp(RATE)
    voice = person_at(espeak_pcm("hello robot how are you", tmp_path, rate=RATE,
                                 voice=PERSON_VOICE), RATE)
    gain = echo_gain_for(np.round(played * 32767).astype(np.int16), RATE, echo_db)
    recorded = to_float(Room(RATE, gain).mic(np.round(played * 32767).astype(np.int16)))
    noise = fan_noise(1.0, RATE)
    report = analyse(played, recorded, RATE, noise=noise,
                     voice=voice + fan_noise(len(voice) / RATE, RATE)[:len(voice)])
    assert report.delay_ms == pytest.approx(1.5, abs=0.5)  # the direct path
    assert report.voice_measured and report.voice_dbfs == pytest.approx(-30, abs=3)
    assert report.echo_over_voice_db == pytest.approx(echo_db, abs=3)
    assert report.removed_db is not None and report.removed_db >= 15
    said = verdict(report)
    if echo_db > 13:
        assert said.startswith(f"your speaker is {round(report.echo_over_voice_db)} dB louder")
        assert "turn the volume down or move the mic" in said
    else:
        assert said.startswith("good")


@pytest.mark.pulse
def test_the_echo_test_on_the_rig_reports_the_room_in_plain_words(pulse_rig, tmp_path):
    pcm = person_at(espeak_pcm("hello robot how are you today", tmp_path, rate=RATE,
                               voice=PERSON_VOICE), RATE)
    speech = tmp_path / "voice.wav"
    sf.write(speech, np.round(pcm * 32767).astype(np.int16), RATE, subtype="PCM_16")
    env = {k: v for k, v in pulse_rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env["HOME"] = str(tmp_path)
    with room(pulse_rig, 20):
        proc = subprocess.Popen(
            [sys.executable, "-m", "r2d2voice", "devices", "--echo-test", "--input-device",
             "pulse", "--output-device", "pulse"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:  # the prompts, in turn
            if line.startswith("now say something"):
                pulse_rig.play(speech)  # the person answers the prompt
                break
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    report["the echo is"] = next(line for line in out.splitlines()
                                 if line.startswith("the echo is")).split()[3]
    delay = float(report["speaker -> microphone delay"].split()[0])
    assert 0 < delay < 500  # the rig's room process adds its own (variable) latency
    assert report["a voice at a metre"].endswith("(measured)")
    assert float(report["the echo is"].split()[0]) > 10, out  # the room is loud: +20 dB
    assert "turn the volume down" in report["verdict"], out  # ... and it says what to do
    (removed,) = [line for line in out.splitlines() if line.startswith("the echo canceller")]
    assert int(removed.split()[4]) > 0, out  # "the echo canceller removes N dB of it"
