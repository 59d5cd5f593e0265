"""The local backend's GPT-Live mode, sans-IO (:class:`LiveLocal`): strict ``session.start``,
turns from an energy VAD, beeps on the session timeline, interruptions, delegation, the faults
— and the Live core talking to it with no socket in between. Every event the backend emits is
checked against the SDK's ``ServerEvent`` (nested Responses events against
``ResponseStreamEvent``), every event the core sends against ``ClientEvent``, strictly."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from livecheck import check_client, check_server
from support import silence, tone

from r2d2voice.live.client_events import LiveConfig
from r2d2voice.live.conversation import LiveConversation
from r2d2voice.localbackend.fault_options import parse_faults
from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.live_reply import LiveReply, words
from r2d2voice.localbackend.live_session import Hangup, Hush, LiveLocal, Speak
from r2d2voice.localbackend.outputs import Tick
from r2d2voice.localbackend.reply import synthesize
from r2d2voice.localbackend.script import parse_script
from r2d2voice.localbackend.wire import CountingIds
from r2d2voice.protocol.actions import (
    BargeIn,
    CallTool,
    Play,
    Send,
    StoreInterrupted,
    StoreMessage,
    StoreSession,
    StoreUsage,
)
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

FRAME = 480
START = {"type": "session.start", "event_id": "evt_1",
         "session": {"model": "gpt-live-1", "instructions": "Be R2.",
                     "audio": {"format": {"type": "audio/pcm", "rate": 24000},
                               "output": {"voice": "marin"}}}}
TURN_HEAD = {"type": "function", "name": "turn_head", "description": "Turn the dome.",
             "parameters": {"type": "object", "properties": {"degrees": {"type": "integer"}}}}


def turn(speech_s: float = 1.0) -> np.ndarray:
    return np.concatenate([silence(0.5), tone(speech_s), silence(1.2)])


class Peer:
    """A :class:`LiveLocal` with a synchronous shell: replies stream only when told."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("clock", lambda: 1_750_000_000.0)
        self.local = LiveLocal(new_id=CountingIds(), **kwargs)
        self.events: list[dict[str, Any]] = []
        self.queue: list[LiveReply] = []
        self.hangups: list[Hangup] = []

    def _act(self, outputs: list[Any]) -> list[dict[str, Any]]:
        got = []
        for out in outputs:
            if isinstance(out, Speak):
                self.queue.append(out.reply)
            elif isinstance(out, Hush):
                self.queue.remove(out.reply)
                got += self._act(self.local.reply_done(out.reply))
            elif isinstance(out, Hangup):
                self.hangups.append(out)
            else:
                got.append(check_server(out))
                self.events.append(out)
        return got

    def send(self, event: dict[str, Any] | str) -> list[dict[str, Any]]:
        return self._act(self.local.receive(event if isinstance(event, str)
                                            else json.dumps(event)))

    def stream(self, pcm: np.ndarray) -> list[dict[str, Any]]:
        got = []
        for i in range(0, len(pcm), FRAME):
            audio = base64.b64encode(pcm[i : i + FRAME].astype("<i2").tobytes()).decode()
            got += self.send({"type": "session.input_audio.append", "audio": audio})
        return got

    def speak(self, fraction: float = 1.0) -> list[dict[str, Any]]:
        """Stream the first queued reply (``fraction`` of it: then it is talked over)."""
        reply = self.queue[0]
        steps = [s for s in reply.steps(synthesize(reply.seed, reply.seconds), 100)
                 if not isinstance(s, Tick)]
        got = []
        for step in steps[: round(len(steps) * fraction)]:
            reply.sent(step)
            got.append(check_server(step))
        self.events += got
        if fraction == 1.0:
            self.queue.pop(0)
            got += self._act(self.local.reply_done(reply))
        return got


def started(**kwargs: Any) -> Peer:
    peer = Peer(**kwargs)
    assert [e["type"] for e in peer.send(START)] == ["session.started"]
    return peer


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# ------------------------------------------------------------------------ session.start


def test_session_start_is_strict_and_first() -> None:
    peer = Peer()
    early = peer.stream(silence(0.1))[0]
    assert early["error"]["code"] == "session_not_started"
    bad = json.loads(json.dumps(START))
    bad["session"]["audio"]["output"]["speed"] = 1.1
    err = peer.send(bad)[0]["error"]
    assert (err["code"], err["param"], err["client_event_id"]) == (
        "unknown_parameter", "session.audio.output.speed", "evt_1")
    ok = peer.send(START)[0]
    assert ok["type"] == "session.started" and ok["client_event_id"] == "evt_1"
    # the model asked for is checked; the session names the local backend's (never billed)
    assert ok["session"]["model"] == "local" and ok["session"]["instructions"] == "Be R2."
    assert peer.send(START)[0]["error"]["code"] == "session_already_started"
    unknown = peer.send({"type": "session.update", "session": {}})[0]["error"]
    assert unknown["param"] == "type"


def test_what_the_core_sends_is_what_the_backend_accepts() -> None:
    config = LiveConfig(instructions="Be R2.", tools=(TURN_HEAD,)).with_history(
        [("user", "I'm Ana"), ("assistant", "*beep*")])
    wire = LiveConversation(config).opening()[0]
    check_client(wire)
    peer = Peer()
    session = peer.send(wire)[0]["session"]
    assert session["delegation"]["responses"]["tools"][0]["name"] == "turn_head"
    assert [i["content"][0]["text"] for i in session["input"]] == ["I'm Ana", "*beep*"]


@pytest.mark.parametrize("field", ["session.delegation", "session.input"])
def test_a_rejected_field_is_refused_by_name(field: str) -> None:
    config = LiveConfig(instructions="x", tools=(TURN_HEAD,)).with_history([("user", "hi")])
    peer = Peer(faults=parse_faults([f"live_reject={field}"]))
    err = peer.send(LiveConversation(config).opening()[0])[0]["error"]
    assert (err["code"], err["param"]) == ("unknown_parameter", field)
    assert peer.send(START)[0]["type"] == "session.started"  # without it, it starts


@pytest.mark.parametrize("code", ["credit_balance_exhausted", "model_not_found"])
def test_no_credit_or_no_model_answers_the_start_and_hangs_up(code: str) -> None:
    peer = Peer(faults=Faults(live_error=code))
    assert peer.send(START)[0]["error"]["code"] == code
    assert peer.hangups == [Hangup(1008, code)]
    assert peer.stream(silence(0.1)) == []  # nothing more


# ------------------------------------------------------------------------ a conversation


def test_a_turn_is_two_input_fragments_then_beeps_on_the_timeline() -> None:
    peer = started(reply_seconds=1.0)
    got = peer.stream(turn(1.0))
    said = [e for e in got if e["type"] == "session.input_transcript.delta"]
    assert "".join(e["delta"] for e in said) == "(speech, 1.0 s)"
    assert said[0]["start_ms"] == said[1]["start_ms"] < said[1]["end_ms"]
    assert len(peer.queue) == 1
    reply = peer.speak()
    out = [e for e in reply if e["type"] == "session.output_transcript.delta"]
    text = "".join(e["delta"] for e in out)
    assert text.startswith("*") and "local backend" in text
    starts = [e["start_ms"] for e in out]
    assert starts == sorted(starts) and starts[0] >= said[1]["end_ms"]
    audio = b"".join(base64.b64decode(e["delta"]) for e in reply
                     if e["type"] == "session.output_audio.delta")
    assert len(audio) == 2 * 24000
    assert kinds(reply)[-1] == "session.usage.updated"


def test_words_concatenate_back_to_the_text() -> None:
    for text in ("*beep, boop* (R2 answers)", "  two  spaces ", "one", ""):
        assert "".join(words(text)) == text


def test_speech_over_the_robot_stops_it() -> None:
    peer = started(reply_seconds=3.0)
    peer.stream(turn(1.0))
    peer.speak(fraction=0.3)  # the robot is a second into three
    got = peer.stream(tone(0.6))  # the person talks over it
    assert peer.queue == []  # hushed: the model stops by itself
    assert kinds(got).count("session.usage.updated") == 1


def test_usage_counts_the_timeline_in_whole_seconds_and_is_a_total() -> None:
    peer = started()
    usages = [e["usage"]["seconds"] for e in peer.stream(silence(31.0))
              if e["type"] == "session.usage.updated"]
    assert usages == [15, 30]


def test_close_answers_with_the_final_usage_and_hangs_up() -> None:
    peer = started()
    peer.stream(silence(2.5))
    closed = peer.send({"type": "session.close", "event_id": "evt_9"})
    assert [(e["type"], e["reason"], e["usage"]["seconds"]) for e in closed] == [
        ("session.closed", "close_requested", 2)]
    assert peer.hangups == [Hangup(1000, "session closed")]


@pytest.mark.parametrize(("spec", "code"), [("expired:1", 1000), ("connection_lost:1", 1011),
                                            ("content", 1000), ("remote_hangup:1", 1000)])
def test_live_close_ends_the_session_after_the_nth_reply(spec: str, code: int) -> None:
    peer = started(faults=parse_faults([f"live_close={spec}"]))
    peer.stream(turn())
    got = peer.speak()
    reason = spec.partition(":")[0]
    assert [e["reason"] for e in got if e["type"] == "session.closed"] == [reason]
    assert peer.hangups == [Hangup(code, f"session {reason}")]


def test_abort_resets_without_session_closed() -> None:
    peer = started(faults=parse_faults(["live_close=abort:1"]))
    peer.stream(turn())
    assert "session.closed" not in kinds(peer.speak())
    assert peer.hangups[0].abort


# ------------------------------------------------------------------------ delegation


def test_a_scripted_call_goes_through_responses_delegation() -> None:
    script = parse_script([{"call": "turn_head", "arguments": {"degrees": 90},
                            "say": "One moment."}])
    peer = Peer(script=script)
    peer.send(LiveConversation(LiveConfig(instructions="x", tools=(TURN_HEAD,))).opening()[0])
    got = peer.stream(turn())
    assert kinds(got)[-4:] == ["session.delegation.created", "response.event",
                               "response.event", "response.event"]
    created = next(e for e in got if e["type"] == "session.delegation.created")
    assert created["delegation"]["target"] == "responses"
    call = next(e["event"]["item"] for e in got if e["type"] == "response.event"
                and e["event"]["type"] == "response.output_item.done")
    assert json.loads(call["arguments"]) == {"degrees": 90}
    assert peer.queue[0].say == "One moment."
    peer.send({"type": "response.item.create", "item": {
        "type": "function_call_output", "call_id": call["call_id"], "output": "turned"}})
    answer = peer.send({"type": "response.create"})
    assert kinds(answer) == ["response.event"] * 3
    assert peer.queue[-1].say == "*beep* (tool turn_head said: turned)"
    again = peer.send({"type": "response.create"})[0]["error"]
    assert again["code"] == "no_pending_response"


def test_a_client_delegation_is_answered_with_commentary() -> None:
    peer = started(script=parse_script([{"call": "lights_on"}]))
    got = peer.stream(turn())
    did = next(e for e in got if e["type"] == "session.delegation.created")["delegation"]
    assert did["target"] == "client" and peer.queue == []
    wrong = peer.send({"type": "session.commentary.append", "content": "x",
                       "delegation_id": "del_other"})[0]["error"]
    assert wrong["param"] == "delegation_id"
    ack = peer.send({"type": "session.commentary.append", "content": "The lights are on.",
                     "delegation_id": did["id"], "event_id": "evt_5"})
    assert kinds(ack) == ["session.commentary.appended"]
    assert peer.queue[0].say == "*beep* (The lights are on.)"
    item = peer.send({"type": "response.item.create", "item": {}})[0]["error"]
    assert "requires Responses delegation" in item["message"]


# ------------------------------------------------------------------------ core <-> backend


class Pair:
    """The Live core and the local backend, wired back to back with no socket; ``now`` (the
    core's clock) moves with the audio sent."""

    def __init__(self, config: LiveConfig, **kwargs: Any) -> None:
        self.core = LiveConversation(config)
        self.peer = Peer(**kwargs)
        self.now = 0.0
        self.actions: list[Any] = []
        for wire in self.core.opening():
            self._up(wire)

    def _up(self, wire: str) -> None:
        check_client(wire)
        self._down(self.peer.send(wire))

    def _down(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            actions = self.core.receive(json.dumps(event), self.now)
            self.actions += actions
            for action in actions:
                if isinstance(action, Send):
                    self._up(self.core.send(action.event))

    def talk(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), FRAME):
            self.now += FRAME / 24000
            self._up(self.core.audio(pcm[i : i + FRAME].astype("<i2").tobytes()))
            self.actions += self.core.tick(self.now)

    def reply(self, fraction: float = 1.0) -> str:
        """Stream the queued replies (the first only ``fraction`` of the way): their words."""
        said = []
        while self.peer.queue:
            events = self.peer.speak(fraction)
            said += [e["delta"] for e in events if e["type"] == "session.output_transcript.delta"]
            self._down(events)
            if fraction < 1.0:
                break
        return "".join(said)

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]

    def record(self) -> list[tuple[str, str]]:
        self.actions += self.core.tick(self.now + 5.0)
        return [(m.role, m.text) for m in sorted(self.of(StoreMessage), key=lambda m: m.seq)]


def test_the_core_against_the_local_backend_stores_each_utterance_byte_exact() -> None:
    pair = Pair(LiveConfig(instructions="Be R2."))
    robot = []
    for speech in (1.0, 1.5):
        pair.talk(turn(speech))
        robot.append(pair.reply())
        pair.talk(silence(1.5))
    assert pair.actions[0] == StoreSession(pair.peer.local.id, "local")
    assert pair.record() == [("user", "(speech, 1.0 s)"), ("assistant", robot[0]),
                             ("user", "(speech, 1.5 s)"), ("assistant", robot[1])]
    sent = b"".join(base64.b64decode(e["delta"]) for e in pair.peer.events
                    if e["type"] == "session.output_audio.delta")
    assert b"".join(p.pcm for p in pair.of(Play)) == sent and len(sent) == 2 * 2 * 24000
    assert [u.seconds for u in pair.of(StoreUsage)] == [
        e["usage"]["seconds"] for e in pair.peer.events if e["type"] == "session.usage.updated"]


def test_talking_over_the_local_robot_cuts_it_on_both_sides() -> None:
    pair = Pair(LiveConfig(instructions="Be R2."), reply_seconds=3.0)
    pair.talk(turn(1.0))
    first = pair.peer.queue[0]
    partial = pair.reply(fraction=0.5)
    pair.talk(np.concatenate([tone(0.8), silence(1.0)]))
    assert first.hushed and first not in pair.peer.queue  # the backend's robot stopped
    assert len(pair.of(BargeIn)) == 1  # and the core stops the speaker
    item = pair.of(Play)[0].item_id
    pair.actions += pair.core.interrupted(item, 24000)
    assert [(m.item_id, m.played_ms) for m in pair.of(StoreInterrupted)] == [(item, 1000)]
    assert pair.record()[:3] == [("user", "(speech, 1.0 s)"), ("assistant", partial),
                                 ("user", "(speech, 0.8 s)")]


def test_a_tool_round_trip_through_the_local_backends_responses_delegation() -> None:
    script = parse_script([{"call": "turn_head", "arguments": {"degrees": 90}}])
    pair = Pair(LiveConfig(instructions="x", tools=(TURN_HEAD,)), script=script)
    pair.talk(turn(1.0))
    calls = pair.of(CallTool)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("turn_head",
                                                                    {"degrees": 90})]
    recorded = pair.of(StoreToolCall)[0]
    pair.actions += pair.core.tool_finished(StoreToolResult(calls[0].call_id, "ok", "turned"))
    for action in pair.actions[-3:]:
        if isinstance(action, Send):
            pair._up(pair.core.send(action.event))
    said = pair.reply()
    assert said == "*beep* (tool turn_head said: turned)"
    record = pair.record()
    assert record == [("user", "(speech, 1.0 s)"), ("assistant", said)]
    user = next(m for m in pair.of(StoreMessage) if m.role == "user")
    assert user.seq < recorded.seq  # the call sits where the model delegated: after the turn
