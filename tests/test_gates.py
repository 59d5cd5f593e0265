"""The half-duplex echo gate as pure logic: the caller says what time it is and whether the
speaker is busy; the gate says which microphone frames go to the service."""

from __future__ import annotations

import numpy as np
from support import silence, tone

from r2d2voice.audio.gates import EchoGate

QUIET = silence(0.02).astype("<i2").tobytes()  # a 20 ms frame of the room
LEAK = tone(0.02, dbfs=-40).astype("<i2").tobytes()  # the speaker, heard faintly by the mic
SHOUT = tone(0.02, dbfs=-15).astype("<i2").tobytes()  # the user, talking over the robot


def frames(gate: EchoGate, frame: bytes, n: int, t0: float, busy: bool) -> list[bytes]:
    out: list[bytes] = []
    for i in range(n):
        out += gate.filter(frame, t0 + i * 0.02, busy)
    return out


def test_frames_pass_when_the_speaker_is_quiet() -> None:
    gate = EchoGate(tail=0.3)
    assert frames(gate, LEAK, 10, 0.0, busy=False) == [LEAK] * 10


def test_frames_are_held_while_the_robot_speaks_and_for_the_tail_after() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=-25.0)
    assert frames(gate, LEAK, 50, 10.0, busy=True) == []  # 1 s of reply: nothing goes out
    last_busy = 10.0 + 49 * 0.02
    # the echo of the last sample still rings in the room: held for 0.3 s more
    assert gate.filter(LEAK, last_busy + 0.29, False) == []
    assert gate.filter(QUIET, last_busy + 0.30, False) == [QUIET]


def test_audio_queued_for_the_speaker_closes_the_gate_before_it_plays() -> None:
    gate = EchoGate(tail=0.3)
    gate.playing(5.0)  # a reply chunk was just handed to the speaker channel
    assert gate.filter(LEAK, 5.1, False) == []
    assert gate.filter(LEAK, 5.31, False) == [LEAK]


def test_zero_tail_holds_only_while_busy() -> None:
    gate = EchoGate(tail=0.0)
    assert gate.filter(LEAK, 1.0, True) == []
    assert gate.filter(LEAK, 1.0, False) == [LEAK]


def test_loud_speech_over_the_robot_opens_the_gate_with_what_was_held() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=-25.0, barge_in_ms=120)
    assert frames(gate, LEAK, 20, 0.0, busy=True) == []
    # five loud frames are not yet enough (120 ms = 6 frames) ...
    assert frames(gate, SHOUT, 5, 0.4, busy=True) == []
    # ... the sixth opens it: the held frames go first, oldest dropped beyond ~300 ms
    opened = gate.filter(SHOUT, 0.5, True)
    assert len(opened) == 15 and opened[-6:] == [SHOUT] * 6
    assert opened[0] == LEAK
    # open until the speaker falls quiet: even the leak goes through now
    assert frames(gate, LEAK, 3, 0.52, busy=True) == [LEAK] * 3


def test_the_gate_closes_again_after_the_speaker_went_quiet() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=-25.0, barge_in_ms=40)
    frames(gate, SHOUT, 2, 0.0, busy=True)
    assert gate.open_until_quiet
    assert gate.filter(QUIET, 1.0, False) == [QUIET]  # quiet: reset
    assert not gate.open_until_quiet
    assert frames(gate, LEAK, 3, 2.0, busy=True) == []  # the next reply is gated again


def test_interrupted_loudness_does_not_add_up() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=-25.0, barge_in_ms=60)
    out = []
    for i in range(30):  # loud, loud, leak, loud, loud, leak, …: never 3 loud in a row
        out += gate.filter(SHOUT if i % 3 != 2 else LEAK, i * 0.02, True)
    assert out == []


def test_no_barge_in_while_the_robot_speaks_when_disabled() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=None)
    assert frames(gate, SHOUT, 50, 0.0, busy=True) == []
    assert len(gate.held) == 0  # nothing is kept for later either


def test_reset_forgets_held_frames() -> None:
    gate = EchoGate(tail=0.3, barge_in_dbfs=-25.0)
    frames(gate, LEAK, 5, 0.0, busy=True)
    assert len(gate.held) == 5
    gate.reset()
    assert len(gate.held) == 0 and gate.loud == 0
    assert np.frombuffer(LEAK, "<i2").size == 480
