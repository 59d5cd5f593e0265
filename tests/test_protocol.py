"""Sans-IO protocol records: every client event validates against the SDK's GA schema, JSON is
made in one place with per-conversation event ids, server events parse into frozen records with
unknown fields tolerated. No trio, no sockets."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter, ValidationError

from r2d2voice.realtime import client_events as c
from r2d2voice.realtime import server_events as s
from r2d2voice.realtime.conversation import Conversation, LocalProtocolError

CLIENT = TypeAdapter(RealtimeClientEvent)
CFG = c.SessionConfig(instructions="Be R2.", voice="verse", transcribe_model="gpt-4o-transcribe",
                      vad_threshold=0.6, vad_prefix_ms=200, vad_silence_ms=700,
                      retention_ratio=0.8, token_limit=12000)
TURN_HEAD = {"type": "function", "name": "turn_head", "description": "Turn the dome.",
             "parameters": {"type": "object", "required": ["degrees"],
                            "properties": {"degrees": {"type": "integer"}}}}
TOOLS_CFG = c.SessionConfig(instructions="x", tools=(TURN_HEAD,), idle_timeout_ms=6000)
BOUNDED_CFG = c.SessionConfig(instructions="x", retention_ratio=0.5, token_limit=4000,
                              max_output_tokens=400)
SEMANTIC_CFG = c.SessionConfig(instructions="x", noise_reduction="far_field",
                               turn_detection="semantic_vad", eagerness="low")

EVERY_CLIENT_EVENT: list[c.ClientEvent] = [
    c.SessionUpdate(CFG),
    c.SessionUpdate(c.SessionConfig(instructions="x")),
    c.SessionUpdate(TOOLS_CFG),
    c.SessionUpdate(BOUNDED_CFG),
    c.SessionUpdate(SEMANTIC_CFG),
    c.SessionUpdate(c.SessionConfig(instructions="x", noise_reduction="near_field")),
    c.ItemCreateFunctionOutput("call_1", "turned to -90"),
    c.AudioAppend(b"\x00\x01" * 480),
    c.AudioCommit(),
    c.AudioClear(),
    c.ItemCreateText("user", "hello"),
    c.ItemCreateText("assistant", "beep"),
    c.ItemCreateText("system", "context follows"),
    c.ItemTruncate("item_1", 1200),
    c.ItemDelete("item_1"),
    c.ResponseCreate(),
    c.ResponseCancel(),
    c.ResponseCancel("resp_1"),
]


@pytest.mark.parametrize("event", EVERY_CLIENT_EVENT, ids=lambda e: e.TYPE)
def test_every_client_event_validates_against_the_ga_schema(event: c.ClientEvent) -> None:
    wire = json.loads(Conversation().send(event))
    parsed = CLIENT.validate_python(wire)
    assert parsed.type == event.TYPE == wire["type"]


def test_schema_check_really_rejects_a_wrong_event() -> None:
    bad = c.to_dict(c.ItemTruncate("item_1", 100), "evt_1")
    bad["audio_end_ms"] = "soon"
    with pytest.raises(ValidationError):
        CLIENT.validate_python(bad)


def test_client_events_are_frozen_slotted_records() -> None:
    ev = c.ItemTruncate("item_1", 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.audio_end_ms = 5  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")
    with pytest.raises(TypeError):
        c.to_dict("conversation.item.delete", "evt_1")  # type: ignore[arg-type]


def test_session_update_is_ga_shaped() -> None:
    sess = c.to_dict(c.SessionUpdate(CFG), "evt_1")["session"]
    assert sess["type"] == "realtime"
    assert sess["output_modalities"] == ["audio"]
    td = sess["audio"]["input"]["turn_detection"]
    assert td == {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                  "silence_duration_ms": 700, "create_response": True,
                  "interrupt_response": True}
    assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert sess["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                       "voice": "verse"}
    assert sess["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe"}
    assert sess["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.8,
                                  "token_limits": {"post_instructions": 12000}}
    # the old beta shape must not leak in
    assert "modalities" not in sess and "input_audio_format" not in sess
    # no tools offered, no idle nudge, no cap on a reply's length, unless asked for
    assert "tools" not in sess and "tool_choice" not in sess and "idle_timeout_ms" not in td
    assert "max_output_tokens" not in sess


def test_a_reply_s_length_and_the_context_are_bounded_when_configured() -> None:
    sess = c.to_dict(c.SessionUpdate(BOUNDED_CFG), "evt_1")["session"]
    assert sess["max_output_tokens"] == 400
    assert sess["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.5,
                                  "token_limits": {"post_instructions": 4000}}
    bad = c.to_dict(c.SessionUpdate(BOUNDED_CFG), "evt_1")
    bad["session"]["max_output_tokens"] = "a lot"  # the schema check can fail on this field
    with pytest.raises(ValidationError):
        CLIENT.validate_python(bad)


def test_noise_reduction_and_semantic_vad_are_asked_for_when_configured() -> None:
    sess = c.to_dict(c.SessionUpdate(SEMANTIC_CFG), "evt_1")["session"]
    assert sess["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
    assert sess["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad", "eagerness": "low", "create_response": True,
        "interrupt_response": True}
    plain = c.to_dict(c.SessionUpdate(CFG), "evt_2")["session"]
    assert "noise_reduction" not in plain["audio"]["input"]  # none asked for: the service's own


def test_tools_and_the_idle_timeout_are_offered_when_configured() -> None:
    sess = c.to_dict(c.SessionUpdate(TOOLS_CFG), "evt_1")["session"]
    assert sess["tools"] == [TURN_HEAD] and sess["tool_choice"] == "auto"
    assert sess["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 6000
    item = c.to_dict(c.ItemCreateFunctionOutput("call_1", "turned"), "evt_2")["item"]
    assert item == {"type": "function_call_output", "call_id": "call_1", "output": "turned"}


def test_append_round_trips_pcm_and_event_ids_are_per_conversation() -> None:
    pcm = bytes(range(256)) * 4
    one, two = Conversation(), Conversation()
    wire = json.loads(one.send(c.AudioAppend(pcm)))
    assert base64.b64decode(wire["audio"]) == pcm
    ids = [json.loads(one.send(e))["event_id"] for e in EVERY_CLIENT_EVENT]
    assert len(set(ids)) == len(ids) and wire["event_id"] not in ids
    # a second conversation counts on its own: no module-global counter
    assert json.loads(two.send(c.AudioCommit()))["event_id"] == wire["event_id"]
    assert one.sent[ids[0]] == "session.update"


def test_sending_on_a_closed_conversation_is_refused() -> None:
    conv = Conversation()
    conv.connection_lost()
    with pytest.raises(LocalProtocolError):
        conv.send(c.AudioCommit())


# --------------------------------------------------------------------------- parsing


def ev(type_: str, **body: object) -> str:
    return json.dumps({"type": type_, "event_id": "event_x", **body})


def test_parse_known_events() -> None:
    audio = base64.b64encode(b"\x01\x00\x02\x00").decode()
    assert s.parse_event(ev("response.output_audio.delta", response_id="r", item_id="i",
                            output_index=0, content_index=0, delta=audio)) == \
        s.AudioDelta("r", "i", b"\x01\x00\x02\x00")
    assert s.parse_event(ev("input_audio_buffer.speech_started", item_id="u",
                            audio_start_ms=120)) == s.SpeechStarted("u", 120)
    assert s.parse_event(ev("conversation.item.input_audio_transcription.completed",
                            item_id="u", content_index=0, transcript="hi",
                            usage={"type": "duration", "seconds": 1})) == \
        s.UserTranscript("u", "hi")
    assert s.parse_event(ev("conversation.item.input_audio_transcription.failed",
                            item_id="u", content_index=0,
                            error={"type": "transcription_error", "message": "noise"})) == \
        s.UserTranscriptFailed("u", "noise")
    done = s.parse_event(ev("response.done", response={
        "id": "r", "status": "incomplete", "status_details": {"reason": "max_output_tokens"},
        "usage": {"input_tokens": 5, "output_tokens": 7}}))
    assert done == s.ResponseDone("r", "incomplete", {"input_tokens": 5, "output_tokens": 7},
                                  {"reason": "max_output_tokens"})
    created = s.parse_event(ev("session.created", session={"id": "sess_1", "model": "m"}))
    assert created == s.SessionCreated("sess_1", "m")
    err = s.parse_event(ev("error", error={"type": "invalid_request_error",
                                           "code": "invalid_api_key", "message": "bad key",
                                           "event_id": "evt_r2_3"}))
    assert isinstance(err, s.ServiceError) and err.fatal and err.event_id == "evt_r2_3"
    expired = s.parse_event(ev("error", error={"type": "invalid_request_error",
                                               "code": "session_expired", "message": "60 min"}))
    assert isinstance(expired, s.ServiceError) and not expired.fatal and expired.ends_session


@pytest.mark.parametrize("junk", [b"\x00\x01binary", "not json {", "[1,2]", '{"no": "type"}',
                                  ev("response.output_audio.delta", response_id="r"),
                                  ev("response.output_audio.delta", response_id="r",
                                     item_id="i", delta="***"),
                                  ev("input_audio_buffer.speech_started", item_id="u",
                                     audio_start_ms=True)])
def test_junk_raises_protocol_error(junk: str | bytes) -> None:
    with pytest.raises(s.ProtocolError):
        s.parse_event(junk)


def test_unknown_types_and_fields_are_tolerated() -> None:
    assert s.parse_event(ev("rate_limits.updated", rate_limits=[])) == \
        s.Ignored("rate_limits.updated")
    assert s.parse_event(ev("something.new")) == s.Ignored("something.new")
    assert s.parse_event(ev("input_audio_buffer.speech_stopped", item_id="u", audio_end_ms=5,
                            brand_new_field={"x": 1})) == s.SpeechStopped("u", 5)
    # fields newer services send: obfuscation on deltas, phase on items, reasoning token counts
    assert s.parse_event(ev("response.output_audio_transcript.delta", response_id="r",
                            item_id="i", output_index=0, content_index=0, delta="be",
                            obfuscation="x9Yz")) == s.TranscriptDelta("r", "i", "be")
    assert s.parse_event(ev("response.output_item.added", response_id="r", output_index=0,
                            item={"id": "i", "type": "message", "role": "assistant",
                                  "phase": "final_answer", "content": []})) == \
        s.OutputItemAdded("r", "i", "assistant")
    usage = {"input_tokens": 5, "output_tokens": 7,
             "output_token_details": {"reasoning_tokens": 3, "audio_tokens": 4}}
    assert s.parse_event(ev("response.done", response={
        "id": "r", "status": "completed", "usage": usage, "conversation_id": "c"})) == \
        s.ResponseDone("r", "completed", usage)


def test_function_calls_and_the_idle_nudge_parse() -> None:
    added = s.parse_event(ev("response.output_item.added", response_id="r", output_index=1,
                             item={"id": "fc", "type": "function_call", "name": "turn_head",
                                   "call_id": "call_1", "arguments": "",
                                   "status": "in_progress"}))
    assert added == s.OutputItemAdded("r", "fc", None, "function_call", "turn_head", "call_1")
    assert s.parse_event(ev("response.function_call_arguments.delta", response_id="r",
                            item_id="fc", output_index=1, call_id="call_1", delta="{\n ")) == \
        s.CallArgumentsDelta("r", "fc", "call_1", "{\n ")
    done = s.parse_event(ev("response.function_call_arguments.done", response_id="r",
                            item_id="fc", output_index=1, call_id="call_1", name="turn_head",
                            arguments='{"degrees": 5}'))
    assert done == s.CallArgumentsDone("r", "fc", "call_1", "turn_head", '{"degrees": 5}')
    assert s.parse_event(ev("input_audio_buffer.timeout_triggered", item_id="u",
                            audio_start_ms=0, audio_end_ms=5000)) == s.TimeoutTriggered("u")
    with pytest.raises(s.ProtocolError):  # a call without its id is of no use
        s.parse_event(ev("response.output_item.added", response_id="r", output_index=1,
                         item={"id": "fc", "type": "function_call", "name": "x"}))


def test_server_records_are_frozen() -> None:
    event = s.SpeechStopped("u", 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.item_id = "v"  # type: ignore[misc]
