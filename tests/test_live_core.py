"""The GPT-Live core, sans-IO: every client event validates (strictly) against the SDK's
``openai.types.live.ClientEvent``, every server event fed in against ``ServerEvent``;
utterances from out-of-order and overlapping deltas, interruptions, usage totals, every close
reason and the tools through Responses delegation. No trio, no sockets: JSON in, actions out."""

from __future__ import annotations

import dataclasses
import json

import pytest
from livecheck import (
    audio,
    backend_call,
    backend_created,
    backend_done,
    check_client,
    closed,
    delegated,
    error,
    said,
    started,
    usage,
)
from pydantic import ValidationError

from r2d2voice.live import client_events as c
from r2d2voice.live.conversation import NO_BACKEND, LiveConversation, LocalProtocolError, Phase
from r2d2voice.protocol.actions import (
    AudioDone,
    BargeIn,
    CallTool,
    HangUp,
    Play,
    Send,
    StoreError,
    StoreInterrupted,
    StoreMessage,
    StoreResponse,
    StoreSession,
    StoreUsage,
    UserSpeaking,
    UserStopped,
)
from r2d2voice.protocol.core import TICK_S, End, EndReason
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

TURN_HEAD = {"type": "function", "name": "turn_head", "description": "Turn the dome.",
             "parameters": {"type": "object", "required": ["degrees"],
                            "properties": {"degrees": {"type": "integer"}}}}
CFG = c.LiveConfig(instructions="Be R2.")
TOOLS = c.LiveConfig(instructions="Be R2.", tools=(TURN_HEAD,), voice="cedar")
SECOND = 24000  # samples


def live(config: c.LiveConfig = CFG, at: float = 0.0) -> LiveConversation:
    """A core past ``session.started`` (received at shell time ``at``)."""
    conv = LiveConversation(config)
    check_client(conv.opening()[0])
    assert conv.receive(started(), at) == [StoreSession("sess_live_1", "gpt-live-1")]
    return conv


def messages(actions: list) -> list[StoreMessage]:
    return [a for a in actions if isinstance(a, StoreMessage)]


def sent(actions: list) -> list[dict]:
    """The wire form of every Send, each validated against the SDK's ClientEvent."""
    conv = LiveConversation(CFG)
    conv.phase = Phase.STARTED
    out = [json.loads(conv.send(a.event)) for a in actions if isinstance(a, Send)]
    for wire in out:
        check_client(wire)
    return out


# ------------------------------------------------------------------------ client events


EVERY_CLIENT_EVENT: list[c.ClientEvent] = [
    c.SessionStart(CFG),
    c.SessionStart(TOOLS),
    c.SessionStart(CFG.with_history([("user", "hello"), ("assistant", "*beep*"),
                                     ("developer", "the person is Ana")])),
    c.SessionStart(c.LiveConfig(instructions="")),
    c.AudioAppend(b"\x00\x01" * 480),
    c.ThinkingAppend("the dome is at 90 degrees"),
    c.ThinkingAppend("checking", "del_1"),
    c.CommentaryAppend("x" * 5000, "del_1"),
    c.FunctionOutput("call_1", "turned to -90"),
    c.ResponseCreate(),
    c.SessionClose(),
]


@pytest.mark.parametrize("event", EVERY_CLIENT_EVENT, ids=lambda e: e.TYPE)
def test_every_client_event_validates_strictly_against_the_sdk(event: c.ClientEvent) -> None:
    conv = LiveConversation(CFG)
    if not isinstance(event, c.SessionStart):
        conv.opening()
        conv.receive(started(), 0.0)
    wire = conv.audio(event.pcm) if isinstance(event, c.AudioAppend) else conv.send(event)
    parsed = check_client(wire)
    assert parsed.type == event.TYPE == json.loads(wire)["type"]


def test_the_strict_check_really_rejects_what_the_service_would() -> None:
    good = c.to_dict(c.SessionStart(CFG), "evt_1")
    check_client(good)
    unknown = json.loads(json.dumps(good))
    unknown["session"]["audio"]["output"]["speed"] = 1.2
    with pytest.raises(AssertionError, match=r"session\.audio\.output\.speed"):
        check_client(unknown)
    wrong = json.loads(json.dumps(good))
    wrong["session"]["audio"]["format"]["rate"] = 44100
    with pytest.raises(ValidationError):
        check_client(wrong)


def test_session_start_carries_model_voice_tools_and_history() -> None:
    start = c.to_dict(c.SessionStart(TOOLS.with_history([("user", "hi"), ("assistant", "")])),
                      "evt_1")["session"]
    assert start["model"] == "gpt-live-1" and start["instructions"] == "Be R2."
    assert start["audio"] == {"format": {"type": "audio/pcm", "rate": 24000},
                              "output": {"voice": "cedar"}}
    responses = start["delegation"]["responses"]
    assert start["delegation"]["type"] == "responses" and responses["model"] == "gpt-5.5"
    assert responses["tools"] == [TURN_HEAD]
    assert start["input"] == [{"type": "message", "role": "user",
                               "content": [{"type": "input_text", "text": "hi"}]}]
    plain = c.to_dict(c.SessionStart(CFG), "evt_1")["session"]
    assert "delegation" not in plain and "input" not in plain


def test_commentary_is_clipped_to_the_services_500_token_cap() -> None:
    wire = c.to_dict(c.CommentaryAppend("y" * 5000, "del_1"), "evt_1")
    assert len(wire["content"]) == c.MAX_APPEND_CHARS and wire["content"].endswith("…")


def test_client_events_are_frozen_slotted_records() -> None:
    ev = c.FunctionOutput("call_1", "ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.output = "no"  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")
    with pytest.raises(TypeError):
        c.to_dict("session.close", "evt_1")  # type: ignore[arg-type]


def test_session_start_is_first_and_only_once_and_audio_waits_for_started() -> None:
    conv = LiveConversation(CFG)
    with pytest.raises(LocalProtocolError):
        conv.audio(b"\x00\x00")
    with pytest.raises(LocalProtocolError):
        conv.send(c.SessionClose())
    first = json.loads(conv.opening()[0])
    assert first["type"] == "session.start" and not conv.configured
    with pytest.raises(LocalProtocolError):
        conv.send(c.SessionStart(CFG))
    conv.receive(started(), 0.0)
    assert conv.configured
    check_client(conv.audio(b"\x00\x00" * 480))
    conv.connection_lost(1006, "gone")
    for attempt in (lambda: conv.audio(b"\x00\x00"), lambda: conv.send(c.ResponseCreate())):
        with pytest.raises(LocalProtocolError):
            attempt()


# ------------------------------------------------------------------------ utterances


def test_one_speakers_deltas_become_one_message_byte_exact_committed_at_the_pause() -> None:
    conv = live()
    parts = ["Héllo", " R2,", "  ", "can you\u00a0hear", " me? 🤖"]
    out = []
    for i, part in enumerate(parts):
        out += conv.receive(said("user", part, 1000 + 300 * i, 1300 + 300 * i), 1.0 + 0.3 * i)
    assert messages(out) == []  # no pause yet: nothing is done in GPT-Live until it is
    assert not conv.idle and not conv.settled
    assert messages(conv.tick(3.0)) == []  # 0.6 s after the last words: not a pause
    done = messages(conv.tick(3.6))
    assert [(m.role, m.text, m.seq) for m in done] == [("user", "".join(parts), 1001)]
    assert [e["delta"] for e in json.loads(done[0].raw)] == parts
    assert conv.idle and conv.settled


def test_a_pause_in_the_timeline_starts_a_new_message_at_once() -> None:
    conv = live()
    conv.receive(said("user", "one", 0, 400), 0.4)
    out = conv.receive(said("user", "two", 1600, 2000), 0.5)  # 1.2 s later on the timeline
    assert [m.text for m in messages(out)] == ["one"]
    assert [m.text for m in messages(conv.connection_lost())] == ["two"]


def test_a_change_of_speaker_closes_the_utterance_at_once() -> None:
    conv = live()
    conv.receive(said("user", "What's up?", 500, 1500), 1.5)
    out = conv.receive(said("assistant", "Beep", 1700, 2000), 1.7)
    assert [(m.role, m.text) for m in messages(out)] == [("user", "What's up?")]
    out = conv.receive(said("user", "Again?", 2600, 3000), 3.0)
    assert [(m.role, m.text) for m in messages(out)] == [("assistant", "Beep")]


def test_out_of_order_deltas_keep_the_order_they_were_said_in() -> None:
    """The person's transcript lags: the robot's answer arrives first, yet sorts after."""
    conv = live()
    out = conv.receive(said("assistant", "I'm ", 2000, 2300), 2.0)
    out += conv.receive(said("assistant", "fine.", 2300, 2700), 2.1)
    out += conv.receive(said("user", "How are", 500, 1100), 2.2)  # said before, arrives after
    out += conv.receive(said("user", " you?", 1100, 1600), 2.3)
    out += conv.tick(10.0)
    got = sorted(messages(out), key=lambda m: m.seq)
    assert [(m.role, m.text) for m in got] == [("user", "How are you?"),
                                                ("assistant", "I'm fine.")]
    assert got[0].seq < got[1].seq


def test_overlapping_speech_is_ordered_by_start_and_neither_is_cut() -> None:
    """The robot says "mm-hm" while the person goes on: two messages, by start."""
    conv = live()
    out = conv.receive(said("user", "So yesterday I", 1000, 2000), 2.0)
    out += conv.receive(said("assistant", "Mm-hm.", 1800, 2100), 2.1)  # over the person
    out += conv.receive(said("user", " went out.", 2000, 3000), 3.0)
    assert messages(out) == []  # overlap is not a change of speaker
    out += conv.tick(10.0)
    got = sorted(messages(out), key=lambda m: m.seq)
    assert [(m.role, m.text) for m in got] == [("user", "So yesterday I went out."),
                                                ("assistant", "Mm-hm.")]


def test_the_timeline_estimate_closes_an_utterance_when_nothing_else_arrives() -> None:
    conv = live(at=100.0)
    conv.receive(said("user", "hi", 200, 500), 100.5)
    assert messages(conv.tick(101.0)) == []
    assert conv.timeline_ms(101.6) == 1600
    assert [m.text for m in messages(conv.tick(101.6))] == ["hi"]


# ------------------------------------------------------------------------ interruptions


def robot_says(conv: LiveConversation, seconds: float, at_ms: int, now: float) -> str:
    """The robot's words at ``at_ms`` and ``seconds`` of its audio: the item id played."""
    out = conv.receive(said("assistant", "Let me tell you a long story", at_ms, at_ms + 400),
                       now)
    out += conv.receive(audio(b"\x01\x00" * int(seconds * SECOND)), now)
    plays = [a for a in out if isinstance(a, Play)]
    assert len(plays) == 1 and len(plays[0].pcm) == int(seconds * SECOND) * 2
    return plays[0].item_id


def test_the_person_talking_over_the_robot_stops_it_and_marks_what_was_played() -> None:
    conv = live()
    item = robot_says(conv, seconds=4.0, at_ms=1000, now=1.0)
    out = conv.receive(said("user", "Wait", 2500, 2800), 2.9)  # 1.5 s into 4 s of audio
    assert isinstance(out[0], BargeIn)
    assert [(m.role, m.item_id) for m in messages(out)] == [("assistant", item)]
    stored = conv.interrupted(item, played_samples=int(1.6 * SECOND))
    assert stored == [StoreInterrupted(item, 1001, 1600)]
    # later audio is new speech (the model heard the person): a new item, played
    again = [a for a in conv.receive(audio(b"\x02\x00" * 2400), 3.5) if isinstance(a, Play)]
    assert again and again[0].item_id != item


def test_played_is_never_more_than_was_received() -> None:
    conv = live()
    item = robot_says(conv, seconds=1.0, at_ms=0, now=0.1)
    conv.receive(said("user", "no", 500, 700), 0.7)
    assert conv.interrupted(item, played_samples=10 * SECOND) == [
        StoreInterrupted(item, 1, 1000)]
    assert conv.interrupted("live_r2_999", 100) == []  # not ours (an earlier session)


def test_speech_after_the_robot_finished_is_no_interruption() -> None:
    conv = live()
    robot_says(conv, seconds=1.0, at_ms=1000, now=1.0)
    out = conv.receive(said("user", "Thanks", 2200, 2600), 2.6)  # its audio ended at 2000
    assert not any(isinstance(a, BargeIn) for a in out)
    assert [m.role for m in messages(out)] == ["assistant"]  # a change of speaker


def test_audio_before_its_words_is_placed_by_the_clock_and_can_be_talked_over() -> None:
    conv = live(at=0.0)
    plays = [a for a in conv.receive(audio(b"\x01\x00" * 2 * SECOND), 1.0)
             if isinstance(a, Play)]
    out = conv.receive(said("user", "stop", 1500, 1700), 1.7)
    assert isinstance(out[0], BargeIn)
    assert conv.interrupted(plays[0].item_id, SECOND // 2) == [
        StoreInterrupted(plays[0].item_id, 1001, 500)]


# ------------------------------------------------------------------------ usage and ends


def test_usage_is_the_services_current_total_never_summed() -> None:
    conv = live()
    out = [a for s in (15, 30, 45) for a in conv.receive(usage(s), s)]
    assert out == [StoreUsage("sess_live_1", 15.0), StoreUsage("sess_live_1", 30.0),
                   StoreUsage("sess_live_1", 45.0)]
    final = conv.receive(closed("close_requested", seconds=52), 52.0)
    assert StoreUsage("sess_live_1", 52.0, final=True) in final
    assert conv.usage_seconds == 52.0


@pytest.mark.parametrize(("reason", "kind"), [
    ("expired", End.EXPIRED), ("connection_lost", End.LOST), ("content", End.LOST),
    ("remote_hangup", End.HANGUP), ("close_requested", End.HANGUP)])
def test_every_close_reason_ends_the_session_its_way(reason: str, kind: End) -> None:
    conv = live()
    conv.receive(said("user", "hello", 0, 500), 0.5)
    out = conv.receive(closed(reason), 0.6)
    assert conv.end is not None and conv.end.kind is kind and reason in conv.end.detail
    assert [(m.text, m.partial) for m in messages(out)] == [("hello", False)]
    assert conv.phase is Phase.CLOSED and conv.connection_lost(1000, "") == []


def test_our_close_is_session_close_once_and_the_first_end_wins() -> None:
    conv = live()
    conv.receive(said("user", "bye", 0, 400), 0.4)
    [goodbye] = conv.finish(EndReason(End.DONE, "input ended"))  # what the link sends
    assert check_client(goodbye).type == "session.close" and conv.phase is Phase.CLOSING
    assert conv.finish(EndReason(End.DONE, "stopping")) == []  # once
    out = conv.receive(closed("close_requested", seconds=3), 1.0)
    assert conv.end == EndReason(End.DONE, "input ended")
    assert [(m.text, m.partial) for m in messages(out)] == [("bye", False)]
    assert [u for u in out if isinstance(u, StoreUsage)] == [
        StoreUsage("sess_live_1", 3, final=True)]
    other = live()
    assert len(other.finish(EndReason(End.RECYCLE, "55 minutes"))) == 1
    other.receive(closed("expired"), 1.0)
    other.connection_lost(1006, "")
    assert other.end == EndReason(End.RECYCLE, "55 minutes")
    # before session.started, or once closed, there is nothing to say on the way out
    assert LiveConversation(CFG).finish(EndReason(End.DONE)) == []
    assert other.finish(EndReason(End.DONE)) == []


def test_a_service_end_sends_nothing_on_its_own() -> None:
    """The service's close and a fatal error set the end without asking to send anything."""
    for message, kind in ((closed("expired"), End.EXPIRED),
                          (error("credit_balance_exhausted", "no credit"), End.FATAL)):
        conv = live()
        sent_before = dict(conv.sent)
        conv.receive(message, 1.0)
        assert conv.sent == sent_before and conv.end is not None and conv.end.kind is kind


def test_what_a_waiting_source_and_the_status_line_see() -> None:
    """Without turns: a stretch of the person counts as heard at its first fragment, a
    stretch of the robot as done once it has been quiet for the pause (on the clock)."""
    conv = live()
    assert (conv.turns_committed, conv.responses_done, conv.user_speaking) == (0, 0, False)
    assert conv.status(False) == "listening" and conv.audio_ready
    conv.receive(said("user", "(speech", 1000, 1000), 1.0)
    assert conv.turns_committed == 1 and conv.user_speaking and not conv.idle
    assert conv.status(False) == "listening (you are speaking)"
    conv.receive(said("user", ", 1.0 s)", 1000, 2000), 1.2)
    conv.receive(said("assistant", "Beep", 2100, 2600), 1.3)
    conv.receive(audio(b"\x01\x00" * 12000), 1.3)
    assert not conv.user_speaking and conv.status(True) == "speaking"
    assert conv.responses_done == 0 and not conv.idle
    conv.tick(2.2)
    assert conv.responses_done == 0  # 0.9 s: not a pause yet
    conv.tick(2.4)
    assert conv.responses_done == 1 and conv.idle and conv.settled
    assert conv.status(False) == "listening"
    assert conv.give_up_transcripts() == [] and not conv.waiting_for_transcript
    conv.receive("not json", 2.5)
    assert conv.statistics() == {"junk_messages": 1}


def test_a_lost_connection_is_lost_and_flushes_partial_utterances() -> None:
    conv = live()
    conv.receive(said("assistant", "Half a sen", 0, 500), 0.5)
    out = conv.connection_lost(1006, "abnormal closure")
    assert [(m.text, m.partial) for m in messages(out)] == [("Half a sen", True)]
    assert conv.end is not None and conv.end.kind is End.LOST and "1006" in conv.end.detail
    assert conv.connection_lost(1006, "") == []


@pytest.mark.parametrize("code", ["credit_balance_exhausted", "model_not_found"])
def test_no_credit_or_no_model_is_fatal(code: str) -> None:
    conv = live()
    out = conv.receive(error(code, "You have no credit left."), 1.0)
    assert out == [StoreError("invalid_request_error", code, "You have no credit left.", True)]
    assert conv.end is not None and conv.end.kind is End.FATAL and code in conv.end.detail


def test_a_refused_session_start_is_a_configuration_error_naming_the_field() -> None:
    conv = LiveConversation(CFG)
    start_id = json.loads(conv.opening()[0])["event_id"]
    out = conv.receive(error("unknown_parameter", "Unknown parameter: 'session.delegation'.",
                             param="session.delegation", client_event_id=start_id), 0.2)
    assert out[0].fatal and "session.delegation" in out[0].message
    assert "in reply to our session.start" in out[0].message
    assert conv.end is not None and conv.end.kind is End.FATAL
    assert "refused the session configuration" in conv.end.detail


def test_an_ordinary_error_is_stored_and_the_session_goes_on() -> None:
    conv = live()
    out = conv.receive(error("invalid_value", "delegation_id unknown",
                             client_event_id="evt_live_9"), 1.0)
    assert out == [StoreError("invalid_request_error", "invalid_value",
                              "delegation_id unknown", False)]
    assert conv.end is None


def test_an_expired_session_commits_what_seeds_the_next_one() -> None:
    """``expired`` commits what was said; the link seeds the next session with the stored
    turns (``LiveConfig.with_history``), which ``session.start`` carries as its input."""
    conv = live(TOOLS)
    out = conv.receive(said("user", "My name is Ana.", 0, 900), 0.9)
    out += conv.receive(said("assistant", "Hello Ana! *beep*", 1200, 2000), 2.0)
    out += conv.receive(closed("expired"), 2.1)
    assert conv.end is not None and conv.end.kind is End.EXPIRED
    stored = [(m.role, m.text) for m in sorted(messages(out), key=lambda m: m.seq)]
    nxt = LiveConversation(TOOLS.with_history(stored))
    start = check_client(nxt.opening()[0])
    assert [(i.role, i.content[0].text) for i in start.session.input] == [
        ("user", "My name is Ana."), ("assistant", "Hello Ana! *beep*")]
    assert start.session.delegation.responses.tools[0].name == "turn_head"


def test_the_seed_respects_the_services_limits() -> None:
    many = [("user", f"line {i}") for i in range(500)]
    history = CFG.with_history(many).history
    assert len(history) == c.MAX_INITIAL_ITEMS and history[-1] == ("user", "line 499")
    long = [("user", "x" * 20_000), ("assistant", "y" * 10_000)]
    assert CFG.with_history(long).history == (("assistant", "y" * 10_000),)
    check_client(c.to_dict(c.SessionStart(CFG.with_history(many)), "evt_1"))


# ------------------------------------------------------------------------ tools


def delegate_call(conv: LiveConversation, *calls: tuple[str, str]) -> list:
    out = conv.receive(delegated("del_1", "responses", 4200, "resp_1"), 5.0)
    out += conv.receive(backend_created("del_1", "resp_1"), 5.0)
    for call_id, args in calls:
        out += conv.receive(backend_call("del_1", call_id, "turn_head", args), 5.1)
    return out + conv.receive(backend_done("del_1", "resp_1"), 5.2)


def test_a_delegated_call_runs_once_its_response_completes_and_its_output_goes_back() -> None:
    conv = live(TOOLS)
    out = delegate_call(conv, ("call_1", '{"degrees": 90}'))
    assert out[0] == StoreResponse("resp_1", "in_progress")
    assert StoreToolCall("call_1", "fc_call_1", "resp_1", 4201, "turn_head",
                         '{"degrees": 90}') in out
    done = next(a for a in out if isinstance(a, StoreResponse) and a.status == "completed")
    assert done.usage["input_token_details"]["text_tokens"] == 120
    assert done.usage["output_token_details"]["text_tokens"] == 30
    assert [a for a in out if isinstance(a, CallTool)] == [
        CallTool("call_1", "turn_head", '{"degrees": 90}', "resp_1")]
    assert not conv.idle  # a tool runs
    result = StoreToolResult("call_1", "ok", "turned to 90", 0, 12.0)
    back = conv.tool_finished(result)
    assert back[0] == result
    assert [(e["type"], e.get("item")) for e in sent(back)] == [
        ("response.item.create", {"type": "function_call_output", "call_id": "call_1",
                                  "output": "turned to 90"}),
        ("response.create", None)]
    assert conv.idle


def test_two_calls_get_one_response_create_after_both_outputs() -> None:
    conv = live(TOOLS)
    delegate_call(conv, ("call_1", "{}"), ("call_2", "{}"))
    first = conv.tool_finished(StoreToolResult("call_1", "ok", "a"))
    assert [e["type"] for e in sent(first)] == ["response.item.create"]
    second = conv.tool_finished(StoreToolResult("call_2", "error", "b", 1))
    assert [e["type"] for e in sent(second)] == ["response.item.create", "response.create"]
    assert conv.tool_finished(StoreToolResult("call_2", "ok", "again")) == [
        StoreToolResult("call_2", "ok", "again")]  # answered once


def test_the_calls_of_a_failed_delegated_response_are_rejected_never_run() -> None:
    conv = live(TOOLS)
    out = conv.receive(backend_created("del_1", "resp_1"), 1.0)
    out += conv.receive(backend_call("del_1", "call_1", "turn_head", "{}"), 1.1)
    out += conv.receive(backend_done("del_1", "resp_1", status="failed"), 1.2)
    assert not any(isinstance(a, CallTool) for a in out)
    rejected = [a for a in out if isinstance(a, StoreToolResult)]
    assert [(r.call_id, r.status) for r in rejected] == [("call_1", "rejected")]
    assert "failed" in rejected[0].output and conv.idle


def test_a_client_delegation_without_tools_is_told_there_is_no_backend() -> None:
    conv = live()
    out = conv.receive(delegated("del_7", "client", 3000), 3.0)
    assert [(e["type"], e["delegation_id"], e["content"]) for e in sent(out)] == [
        ("session.commentary.append", "del_7", NO_BACKEND)]


def test_end_conversation_hangs_up_after_the_goodbye_unless_talked_over() -> None:
    conv = live(TOOLS)
    delegate_call(conv, ("call_1", "{}"))
    conv.tick(6.0)
    conv.tool_finished(StoreToolResult("call_1", "ok", "bye"), hang_up=True)
    out = conv.receive(said("assistant", "Goodbye!", 6500, 7000), 7.0)
    out += conv.tick(9.0)
    assert [type(a) for a in out if isinstance(a, (StoreMessage, HangUp))] == [
        StoreMessage, HangUp]
    again = live(TOOLS)
    delegate_call(again, ("call_1", "{}"))
    again.tool_finished(StoreToolResult("call_1", "ok", "bye"), hang_up=True)
    item = robot_says(again, 2.0, at_ms=6000, now=6.0)
    out = again.receive(said("user", "no wait", 6500, 6900), 6.9)
    out += again.interrupted(item, SECOND // 2) + again.tick(20.0)
    assert not any(isinstance(a, HangUp) for a in out)


# ------------------------------------------------------------------------ robustness


def test_junk_and_unknown_events_and_fields_are_tolerated() -> None:
    conv = live()
    assert conv.receive(b"\x00\x01", 1.0) == [] and conv.receive("not json {", 1.0) == []
    assert conv.receive('{"type": "session.delegation.created"}', 1.0) == []
    assert conv.junk_messages == 3
    assert conv.receive('{"type": "session.future.thing", "x": 1}', 1.0) == []
    extra = json.loads(said("user", "hi", 0, 100))
    extra["speaker_confidence"] = 0.9
    conv.receive(json.dumps(extra), 1.1)
    assert [m.text for m in messages(conv.tick(5.0))] == ["hi"]


def test_a_long_session_keeps_bounded_state() -> None:
    conv = live()
    for i in range(2000):
        role = "user" if i % 2 == 0 else "assistant"
        conv.receive(said(role, f"utterance {i}", i * 2000, i * 2000 + 500), i * 2.0)
        if role == "assistant":
            conv.receive(audio(b"\x00\x00" * 240), i * 2.0)
        conv.send(c.ThinkingAppend("note"))
    assert conv.utterances.committed == 1999
    assert len(conv.utterances._robot) <= 8
    assert len(conv.sent) <= 64 and len(conv.utterances.open) <= 2


def test_the_live_core_has_every_member_of_the_protocol_seam() -> None:
    """What the link calls (``protocol.core.ProtocolCore``), with the same parameters."""
    import inspect

    from r2d2voice.protocol.core import ProtocolCore

    members = {name: value for name, value in vars(ProtocolCore).items()
               if not name.startswith("_")}
    assert {"opening", "audio", "send", "receive", "tick", "connection_lost", "finish",
            "interrupted", "first_played", "tool_finished", "configured", "idle", "settled",
            "awaiting_play", "audio_ready", "statistics", "status", "give_up_transcripts",
            "user_speaking", "waiting_for_transcript"} <= set(members)
    conv = live()
    for name in ProtocolCore.__annotations__:  # the attributes: end, tick_interval, counts
        assert hasattr(conv, name), name
    assert conv.end is None and conv.tick_interval == TICK_S
    for name, value in members.items():
        ours = getattr(LiveConversation, name)
        if isinstance(value, property):
            assert isinstance(ours, property), name
            continue
        if callable(value):
            assert list(inspect.signature(ours).parameters) == list(
                inspect.signature(value).parameters), name


def test_the_core_says_who_speaks_and_when_the_robots_audio_is_over() -> None:
    """The event stream's user_speaking / user_stopped / spoken come from the core: a stretch
    of the person's words begins and ends (here: the robot answers), and the robot's audio is
    over once it has been quiet for the pause (or its stretch closed), told once."""
    conv = live()
    out = conv.receive(said("user", "What's up?", 500, 1500), 1.5)
    [speaking] = [a for a in out if isinstance(a, UserSpeaking)]
    out = conv.receive(said("assistant", "Beep", 1700, 2000), 1.7)
    assert [a for a in out if isinstance(a, UserStopped)] == [UserStopped(speaking.user_item_id)]
    [play] = [a for a in conv.receive(audio(b"\x01\x00" * SECOND), 1.8) if isinstance(a, Play)]
    assert not [a for a in conv.tick(2.5) if isinstance(a, AudioDone)]  # not quiet long enough
    assert [a for a in conv.tick(2.9) if isinstance(a, AudioDone)] == [AudioDone(play.item_id)]
    assert not [a for a in conv.tick(4.5) + conv.connection_lost() if isinstance(a, AudioDone)]
