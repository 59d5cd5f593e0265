"""What a run tells its event stream, from where each moment happens: the turn (the protocol
core's actions), the speaker (the playout buffer), tools, sessions, conversations and the
session gates. Whole conversations with the real local backend through the real pipeline, on
trio's MockClock (``tests/local_link.py``), followed by a hub of the test's own."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_service import MemorySessions, realtime
from local_link import CFG, LocalLink, inline_threads, talk

from r2d2voice.appliance.gate import AlwaysGate, WakeGate, WakeTrigger
from r2d2voice.appliance.sinks import WavSink
from r2d2voice.appliance.switch import LISTENING_OFF, ListeningSwitch
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.audio.pcm import RATE
from r2d2voice.audio.wake import WakeWordDetector
from r2d2voice.link.connection import CLOSE_DEADLINE
from r2d2voice.link.state import Quiet
from r2d2voice.localbackend.script import Script, ScriptTurn
from r2d2voice.protocol.actions import StoreInterrupted, StoreMessage
from r2d2voice.system.events import Events

#: the moments that say what the robot is doing, in the order a turn goes through them
TURN = ("conversation_started", "conversation_ended", "listening", "user_speaking",
        "user_stopped", "thinking", "speaking", "spoken", "waiting_for_wake", "wake")


@pytest.fixture(autouse=True)
def _inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    inline_threads(monkeypatch)


async def followed(run: Callable[[Events], Awaitable[Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Every moment (level too) of ``run(hub)``, as the JSON objects a follower gets."""
    hub = Events(clock=trio.current_time)
    got: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        sub = hub.subscribe(level=True, bound=100_000)

        async def collect() -> None:
            async for moment in sub.receive:
                got.append(json.loads(moment.line))

        nursery.start_soon(collect)
        result = await run(hub)
        hub.close()
    return got, result


def names(moments: list[dict[str, Any]], wanted: tuple[str, ...] = TURN) -> list[str]:
    return [m["event"] for m in moments if m["event"] in wanted]


def replies(moments: list[dict[str, Any]]) -> list[tuple[dict, list[dict], dict]]:
    """(speaking, the levels between it and its spoken, spoken) of each reply."""
    out, start = [], None
    for i, m in enumerate(moments):
        if m["event"] == "speaking":
            start = i
        elif m["event"] == "spoken":
            assert start is not None and moments[start]["item_id"] == m["item_id"]
            out.append((moments[start], [x for x in moments[start:i] if x["event"] == "level"],
                        m))
            start = None
    return out


def wav(tmp_path: Path, *, realtime: bool = True) -> WavSink:
    """A speaker that plays in real time (trio's clock): one 20 ms block per tick."""
    return WavSink(str(tmp_path / "reply.wav"), realtime=realtime)


async def test_a_conversation_tells_each_turn_and_what_the_speaker_played(
        autojump_clock, tmp_path: Path) -> None:
    link = LocalLink()
    moments, (_, sessions) = await followed(lambda hub: talk(
        link, realtime(1.0, 1.5, 1.0, 2.5), sink=wav(tmp_path), events=hub))
    one_turn = ["user_speaking", "user_stopped", "thinking", "speaking", "spoken", "listening"]
    assert names(moments) == ["conversation_started", "listening", *one_turn, *one_turn,
                              "conversation_ended"]
    ended = [m for m in moments if m["event"] == "conversation_ended"]
    assert [m["reason"] for m in ended] == ["end of input"]
    # each reply: speaking at its first sample, 20 levels a second while it plays (1 s of
    # beeps at -12 dBFS peak), spoken with all of it played
    stored = [m.item_id for _, m in sessions.messages() if m.role == "assistant"]
    assert [s["item_id"] for s, _, _ in replies(moments)] == stored
    for speaking, levels, spoken in replies(moments):
        assert spoken == {**spoken, "interrupted": False, "played_ms": 1000}
        assert len(levels) == 20
        assert all(0 <= m["rms"] < 0.25 for m in levels) and max(m["rms"] for m in levels) > 0.05
        assert spoken["mono"] - speaking["mono"] == pytest.approx(1.0, abs=0.1)
    # what was said, as stored, in order; every moment of the session carries its id
    said = [(m["role"], m["text"]) for m in moments if m["event"] == "transcript"]
    assert said == [(m.role, m.text) for _, m in sessions.messages()]
    assert {m["session_id"] for m in moments if m["event"] not in (
        "conversation_started", "conversation_ended", "level")} == {"s0"}
    monos = [m["mono"] for m in moments]
    assert monos == sorted(monos)


async def test_a_fast_replay_tells_the_same_replies_levels_inside_each(
        autojump_clock, tmp_path: Path) -> None:
    """A WAV sink in fast mode takes each chunk at once (the queue runs dry after every one):
    a reply is still spoken once, when its response is done, its levels between."""
    from fake_service import fast

    moments, _ = await followed(lambda hub: talk(
        LocalLink(), fast(1.0, 1.5, 1.0, 1.5), sink=wav(tmp_path, realtime=False), events=hub))
    assert [(len(levels), spoken["played_ms"]) for _, levels, spoken in replies(moments)] == [
        (20, 1000), (20, 1000)]
    assert all(m["event"] != "level" or any(
        x["event"] == "speaking" for x in moments[:i]) for i, m in enumerate(moments))


async def test_a_barge_in_is_user_speaking_then_the_reply_spoken_interrupted_as_stored(
        autojump_clock, tmp_path: Path) -> None:
    moments, (_, sessions) = await followed(lambda hub: talk(
        LocalLink(), realtime(1.0, 0.6, 1.0, 2.5), sink=wav(tmp_path), events=hub))
    (_, _, first), (_, _, second) = replies(moments)
    [stored] = sessions.of_type(StoreInterrupted)
    assert first["interrupted"] is True and first["item_id"] == stored.item_id
    assert first["played_ms"] == stored.played_ms and 0 < first["played_ms"] < 1000
    assert second["interrupted"] is False and second["played_ms"] == 1000
    after = names(moments)[names(moments).index("speaking"):]
    assert after[:3] == ["speaking", "user_speaking", "spoken"]  # the person talked over it


def turn(call: str | None = None, say: str | None = None, **arguments: Any) -> ScriptTurn:
    return ScriptTurn(say=say, call=call, arguments=json.dumps(arguments))


async def test_tools_and_a_hang_up_end_one_conversation_and_speech_starts_the_next(
        autojump_clock, tmp_path: Path) -> None:
    """The model calls get_time, then end_conversation; after the goodbye no session is open
    until the microphone hears speech again (the dormant gate: listening, locally)."""
    toolbox = Toolbox(("get_time", "end_conversation"))
    link = LocalLink(script=Script((turn("get_time", "Let me look."),
                                    turn("end_conversation", "Bye then."))))
    config = replace(CFG, tools=tuple(toolbox.session_tools()))
    moments, (ctx, _) = await followed(lambda hub: talk(
        link, realtime(1.0, 3.5, 1.0, 4.0, 1.0, 3.0), config=config, toolbox=toolbox,
        sink=wav(tmp_path), events=hub,
        gate=AlwaysGate(live=True, vad=(0.5, 300, 500), console=Quiet(), events=hub)))
    tools = [(m["event"], m["name"], m.get("status"), m["session_id"]) for m in moments
             if m["event"].startswith("tool_")]
    assert tools[:4] == [("tool_started", "get_time", None, "s0"),
                         ("tool_finished", "get_time", "ok", "s0"),
                         ("tool_started", "end_conversation", None, "s0"),
                         ("tool_finished", "end_conversation", "ok", "s0")]
    # while the tool runs and its answer is made, the robot is thinking; then it speaks again
    first = names(moments)[:12]
    assert first == ["conversation_started", "listening", "user_speaking", "user_stopped",
                     "thinking", "speaking", "spoken", "thinking", "speaking", "spoken",
                     "listening", "user_speaking"]
    ended = [(m["reason"], m["session_id"]) for m in moments
             if m["event"] == "conversation_ended"]
    assert ended == [("hangup", "s0"), ("end of input", "s1")]
    assert ctx.session_ids == ["s0", "s1"]
    # dormant after the hang-up: listening (for speech, locally), then a new conversation
    tail = names(moments)[names(moments).index("conversation_ended"):][:5]
    assert tail == ["conversation_ended", "listening", "conversation_started", "listening",
                    "user_speaking"]
    restarted = next(m["mono"] for m in moments[1:] if m["event"] == "conversation_started")
    assert restarted == pytest.approx(9.5, abs=0.1)  # the third turn's onset


class Silent:
    """A speaker that is missing: what it is handed is dropped (as DeviceSink does)."""

    async def run(self, receive: trio.MemoryReceiveChannel[Any], buffer: Any) -> None:
        async with receive:
            async for chunk in receive:
                buffer.push(chunk.item_id, chunk.pcm)
                buffer.clear()


async def test_a_reply_that_never_reached_the_speaker_is_neither_speaking_nor_spoken(
        autojump_clock) -> None:
    moments, (_, sessions) = await followed(lambda hub: talk(
        LocalLink(), realtime(1.0, 2.5), sink=Silent(), events=hub))
    assert names(moments) == ["conversation_started", "listening", "user_speaking",
                              "user_stopped", "thinking", "listening", "conversation_ended"]
    assert not [m for m in moments if m["event"] == "level"]
    assert [m.role for _, m in sessions.messages()] == ["user", "assistant"]


async def test_listening_switched_off_ends_the_conversation_and_the_microphone_goes_nowhere(
        autojump_clock, tmp_path: Path) -> None:
    """Turns at 0, 2.5 and 5 s; off from 2 s to 4.5 s: the second is never heard, the third
    is answered in a new conversation."""
    switch = ListeningSwitch(AlwaysGate(live=False, vad=(0.5, 300, 500), console=Quiet()))

    async def run(hub: Events) -> Any:
        async with trio.open_nursery() as nursery:

            async def flip() -> None:
                await trio.sleep(2.0)
                switch.set(False)
                await trio.sleep(2.5)
                switch.set(True)

            nursery.start_soon(flip)
            return await talk(link, realtime(1.0, 1.5, 1.0, 1.5, 1.0, 2.5), sink=wav(tmp_path),
                              events=hub, gate=switch)

    link = LocalLink()
    moments, (ctx, sessions) = await followed(run)
    ended = [(m["reason"], m["mono"]) for m in moments if m["event"] == "conversation_ended"]
    assert [r for r, _ in ended] == [LISTENING_OFF, "end of input"]
    # at once: the connection is closed (the close handshake has CLOSE_DEADLINE)
    assert 2.0 <= ended[0][1] <= 2.0 + CLOSE_DEADLINE + 0.05
    started = [m["mono"] for m in moments if m["event"] == "conversation_started"]
    assert started[1] == pytest.approx(4.5, abs=0.05)
    assert ctx.session_ids == ["s0", "s1"] and link.connections == 2
    said = [(sid, m.role) for sid, m in sessions.messages() if isinstance(m, StoreMessage)]
    assert said == [("s0", "user"), ("s0", "assistant"), ("s1", "user"), ("s1", "assistant")]
    # the service heard nothing of the time the switch was off: 2 s, then from 4.5 s on
    heard = [sum(len(e["audio"]) * 3 // 4 for e in link.of_type("input_audio_buffer.append", n))
             / 2 / RATE for n in (0, 1)]
    assert heard[0] == pytest.approx(2.0, abs=0.1) and heard[1] == pytest.approx(
        8.5 - 4.5 + 1.2, abs=0.3)  # the rest of the file and replay's closing silence


def wake_gate(trigger: WakeTrigger, *, idle_s: float = 3.0) -> WakeGate:
    return WakeGate(WakeWordDetector("hey_mycroft"), idle_s=idle_s, wake_word="hey_mycroft",
                    console=Quiet(), trigger=trigger, earcons=False)


async def test_the_wake_gate_says_it_waits_is_woken_and_the_conversation_ends_when_idle(
        autojump_clock, tmp_path: Path) -> None:
    trigger = WakeTrigger()
    gate = wake_gate(trigger)

    async def run(hub: Events) -> Any:
        gate.events = hub
        async with trio.open_nursery() as nursery:

            async def press() -> None:
                await trio.sleep(1.0)
                trigger.wake()

            nursery.start_soon(press)
            return await talk(LocalLink(), realtime(0.0, 9.0), events=hub, gate=gate)

    try:
        moments, (ctx, _) = await followed(run)
    finally:
        gate.detector.close()
    assert names(moments) == ["waiting_for_wake", "wake", "conversation_started", "listening",
                              "conversation_ended", "waiting_for_wake"]
    wake = next(m for m in moments if m["event"] == "wake")
    assert (wake["source"], wake["score"], wake["session_id"]) == ("external", None, None)
    assert wake["mono"] == pytest.approx(1.0, abs=0.05)
    ended = next(m for m in moments if m["event"] == "conversation_ended")
    assert ended["reason"] == "idle" and ended["session_id"] == ctx.session_ids[0]
    assert 3.0 <= ended["mono"] - wake["mono"] <= 3.0 + 1.0 + CLOSE_DEADLINE
    assert not [m for m in moments if m["event"] in ("speaking", "spoken")]


async def test_a_wake_from_outside_while_switched_off_is_dropped(
        autojump_clock, tmp_path: Path) -> None:
    trigger = WakeTrigger()
    wake = wake_gate(trigger, idle_s=2.0)
    switch = ListeningSwitch(wake, on=False, trigger=trigger)

    async def run(hub: Events) -> Any:
        wake.events = hub
        async with trio.open_nursery() as nursery:

            async def press() -> None:
                await trio.sleep(0.5)
                trigger.wake()  # off: dropped
                await trio.sleep(1.0)
                switch.set(True)
                await trio.sleep(1.0)
                trigger.wake()  # on: a conversation

            nursery.start_soon(press)
            return await talk(LocalLink(), realtime(0.0, 6.0), events=hub, gate=switch,
                              sessions=MemorySessions())

    try:
        moments, (ctx, _) = await followed(run)
    finally:
        wake.detector.close()
    woken = [m["mono"] for m in moments if m["event"] == "wake"]
    assert woken == [pytest.approx(2.5, abs=0.05)] and len(ctx.session_ids) == 1
    assert names(moments)[:2] == ["waiting_for_wake", "wake"]


async def test_gpt_live_tells_the_same_turns_from_its_own_core(autojump_clock,
                                                               tmp_path: Path) -> None:
    """The local backend's Live mode through the Live core: no responses to wait for (no
    ``thinking``), the person's stretches and the robot's, each reply spoken once its audio
    went quiet and played out."""
    from test_live_link import LIVE_CORE, LIVE_PATH

    link = LocalLink(path=LIVE_PATH, realtime_factor=1.0)
    moments, (_, sessions) = await followed(lambda hub: talk(
        link, realtime(1.0, 2.5, 1.5, 3.0), protocol=LIVE_CORE, sink=wav(tmp_path),
        events=hub))
    one_turn = ["user_speaking", "user_stopped", "speaking", "spoken", "listening"]
    assert names(moments) == ["conversation_started", "listening", *one_turn, *one_turn,
                              "conversation_ended"]
    spoken = [s for _, _, s in replies(moments)]
    assert len(spoken) == 2 and all(s["played_ms"] > 0 for s in spoken)
    assert [m.item_id for _, m in sessions.messages() if m.role == "assistant"] == [
        s["item_id"] for s in spoken]
