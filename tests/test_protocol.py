"""Sans-IO protocol core: builders validate against the SDK's GA schema; the conversation state
machine turns realistic server event sequences into the right actions. No trio, no sockets."""

from __future__ import annotations

import base64
import json

import pytest
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter, ValidationError

from r2d2voice.realtime import protocol as p

CLIENT = TypeAdapter(RealtimeClientEvent)
CFG = p.SessionConfig(instructions="Be R2.", voice="verse", transcribe_model="gpt-4o-transcribe",
                      vad_threshold=0.6, vad_prefix_ms=200, vad_silence_ms=700,
                      retention_ratio=0.8, token_limit=12000)


def every_client_event() -> list[dict]:
    return [
        p.session_update(CFG),
        p.session_update(p.SessionConfig(instructions="x")),
        p.input_audio_append(b"\x00\x01" * 480),
        p.input_audio_commit(),
        p.input_audio_clear(),
        p.item_create_text("user", "hello"),
        p.item_create_text("assistant", "beep"),
        p.item_create_text("system", "context follows"),
        p.item_truncate("item_1", 1200),
        p.item_delete("item_1"),
        p.response_create(),
        p.response_cancel(),
        p.response_cancel("resp_1"),
    ]


@pytest.mark.parametrize("event", every_client_event(), ids=lambda e: e["type"])
def test_every_client_event_validates_against_the_ga_schema(event: dict) -> None:
    parsed = CLIENT.validate_python(json.loads(json.dumps(event)))
    assert parsed.type == event["type"]


def test_schema_check_really_rejects_a_wrong_event() -> None:
    bad = p.item_truncate("item_1", 100)
    bad["audio_end_ms"] = "soon"
    with pytest.raises(ValidationError):
        CLIENT.validate_python(bad)


def test_session_update_is_ga_shaped() -> None:
    s = p.session_update(CFG)["session"]
    assert s["type"] == "realtime"
    assert s["output_modalities"] == ["audio"]
    td = s["audio"]["input"]["turn_detection"]
    assert td == {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                  "silence_duration_ms": 700, "create_response": True,
                  "interrupt_response": True}
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                    "voice": "verse"}
    assert s["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe"}
    assert s["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.8,
                               "token_limits": {"post_instructions": 12000}}
    # the old beta shape must not leak in
    assert "modalities" not in s and "input_audio_format" not in s


def test_append_round_trips_pcm_and_event_ids_are_unique() -> None:
    pcm = bytes(range(256)) * 4
    ev = p.input_audio_append(pcm)
    assert base64.b64decode(ev["audio"]) == pcm
    ids = {e["event_id"] for e in every_client_event()}
    assert len(ids) == len(every_client_event())


# --------------------------------------------------------------------------- parsing


def ev(type_: str, **body: object) -> str:
    return json.dumps({"type": type_, "event_id": "event_x", **body})


def test_parse_known_events() -> None:
    audio = base64.b64encode(b"\x01\x00\x02\x00").decode()
    assert p.parse_event(ev("response.output_audio.delta", response_id="r", item_id="i",
                            output_index=0, content_index=0, delta=audio)) == \
        p.AudioDelta("r", "i", b"\x01\x00\x02\x00")
    assert p.parse_event(ev("input_audio_buffer.speech_started", item_id="u",
                            audio_start_ms=120)) == p.SpeechStarted("u", 120)
    assert p.parse_event(ev("conversation.item.input_audio_transcription.completed",
                            item_id="u", content_index=0, transcript="hi",
                            usage={"type": "duration", "seconds": 1})) == \
        p.UserTranscript("u", "hi")
    done = p.parse_event(ev("response.done", response={
        "id": "r", "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 7}}))
    assert done == p.ResponseDone("r", "completed", {"input_tokens": 5, "output_tokens": 7})
    err = p.parse_event(ev("error", error={"type": "invalid_request_error",
                                           "code": "invalid_api_key", "message": "bad key"}))
    assert isinstance(err, p.ServiceError) and err.fatal
    expired = p.parse_event(ev("error", error={"type": "invalid_request_error",
                                               "code": "session_expired", "message": "60 min"}))
    assert isinstance(expired, p.ServiceError) and not expired.fatal and expired.ends_session


@pytest.mark.parametrize("junk", [b"\x00\x01binary", "not json {", "[1,2]", '{"no": "type"}',
                                  ev("response.output_audio.delta", response_id="r"),
                                  ev("response.output_audio.delta", response_id="r",
                                     item_id="i", delta="***")])
def test_junk_raises_protocol_error(junk: str | bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_event(junk)


def test_unknown_and_extra_fields_are_tolerated() -> None:
    assert p.parse_event(ev("rate_limits.updated", rate_limits=[])) == \
        p.Ignored("rate_limits.updated")
    assert p.parse_event(ev("something.new")) == p.Ignored("something.new")
    assert p.parse_event(ev("input_audio_buffer.speech_stopped", item_id="u", audio_end_ms=5,
                            brand_new_field={"x": 1})) == p.SpeechStopped("u", 5)


# --------------------------------------------------------------------------- conversation


def turn_events(user: str, resp: str, item: str, text: str, pcm: bytes) -> list[str]:
    b64 = base64.b64encode(pcm).decode()
    half = len(text) // 2
    return [
        ev("input_audio_buffer.speech_started", item_id=user, audio_start_ms=0),
        ev("input_audio_buffer.speech_stopped", item_id=user, audio_end_ms=900),
        ev("input_audio_buffer.committed", item_id=user, previous_item_id=None),
        ev("response.created", response={"id": resp, "status": "in_progress"}),
        ev("response.output_item.added", response_id=resp, output_index=0,
           item={"id": item, "type": "message", "role": "assistant", "content": []}),
        ev("response.output_audio.delta", response_id=resp, item_id=item, output_index=0,
           content_index=0, delta=b64),
        ev("response.output_audio_transcript.delta", response_id=resp, item_id=item,
           output_index=0, content_index=0, delta=text[:half]),
        ev("response.output_audio_transcript.delta", response_id=resp, item_id=item,
           output_index=0, content_index=0, delta=text[half:]),
        # the user's transcript often lands after the reply has started
        ev("conversation.item.input_audio_transcription.completed", item_id=user,
           content_index=0, transcript="hello robot", usage={"type": "duration", "seconds": 1}),
        ev("response.output_audio_transcript.done", response_id=resp, item_id=item,
           output_index=0, content_index=0, transcript=text),
        ev("response.done", response={"id": resp, "status": "completed",
                                      "usage": {"input_tokens": 10, "output_tokens": 20}}),
    ]


def feed(conv: p.Conversation, messages: list[str], t0: float = 1000.0) -> list[p.Action]:
    out: list[p.Action] = []
    for i, m in enumerate(messages):
        out += conv.receive(p.parse_event(m), t0 + i * 0.1)
    return out


def test_a_whole_turn_yields_audio_transcripts_usage_and_latency() -> None:
    conv = p.Conversation()
    out = feed(conv, [ev("session.created", session={"id": "sess_1", "model": "m"})])
    assert out == [p.StoreSession("sess_1", "m")]
    pcm = b"\x10\x00" * 2400
    out = feed(conv, turn_events("u1", "r1", "a1", "Beep boop!", pcm), t0=2000.0)
    plays = [a for a in out if isinstance(a, p.Play)]
    assert [a.pcm for a in plays] == [pcm]
    msgs = [a for a in out if isinstance(a, p.StoreMessage)]
    assert [(m.role, m.item_id, m.text) for m in msgs] == [
        ("user", "u1", "hello robot"), ("assistant", "a1", "Beep boop!")]
    user, assistant = msgs
    # conversation order: the user's line is dated at its commit, before the reply
    assert user.created_at == pytest.approx(2000.1)
    assert user.created_at < assistant.created_at
    assert assistant.response_id == "r1" and '"transcript": "Beep boop!"' in assistant.raw
    resp = [a for a in out if isinstance(a, p.StoreResponse)]
    assert resp[0].status == "completed" and resp[0].usage == {"input_tokens": 10,
                                                                "output_tokens": 20}
    # speech stopped at +0.1 s, first audio at +0.5 s
    assert resp[0].first_audio_ms == pytest.approx(400.0)
    assert conv.idle and conv.turns_committed == 1 and conv.responses_done == 1
    assert conv.usage_totals == {"input_tokens": 10, "output_tokens": 20}
    assert conv.received_samples("a1") == 2400


def test_barge_in_truncates_at_what_was_played_never_more_than_received() -> None:
    conv = p.Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Long reply", b"\x00\x00" * 24000))
    out = conv.receive(p.SpeechStarted("u2", 5000), 3000.0)
    assert out == [p.BargeIn("u2")]
    truncate, stored = conv.interrupted("a1", played_samples=12000)
    assert isinstance(truncate, p.Send)
    assert truncate.event["type"] == "conversation.item.truncate"
    assert truncate.event["item_id"] == "a1" and truncate.event["audio_end_ms"] == 500
    assert stored == p.StoreInterrupted("a1", 500)
    # claims of more playback than audio received are capped at what was received
    _, capped = conv.interrupted("a1", played_samples=10**9)
    assert capped == p.StoreInterrupted("a1", 1000)


def test_barge_in_before_anything_was_played_deletes_the_item() -> None:
    conv = p.Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "x", b"\x00\x00" * 240))
    send, stored = conv.interrupted("a1", played_samples=0)
    assert send.event["type"] == "conversation.item.delete"
    assert CLIENT.validate_python(send.event).type == "conversation.item.delete"
    assert stored == p.StoreInterrupted("a1", 0)


def test_cut_off_reply_keeps_its_partial_transcript() -> None:
    conv = p.Conversation()
    msgs = turn_events("u1", "r1", "a1", "Hello there friend", b"\x00\x00" * 10)
    cancelled = ev("response.done", response={"id": "r1", "status": "cancelled"})
    # drop the transcript.done; the response ends cancelled
    out = feed(conv, [*msgs[:8], cancelled])
    partial = [a for a in out if isinstance(a, p.StoreMessage) and a.role == "assistant"]
    assert len(partial) == 1 and partial[0].partial and partial[0].text == "Hello there friend"
    assert conv.idle


def test_flush_on_disconnect_stores_unfinished_transcripts() -> None:
    conv = p.Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Half a sent", b"")[:7])
    flushed = conv.flush(5000.0)
    assert [(a.role, a.text, a.partial) for a in flushed] == [("assistant", "Half ", True)]
    assert conv.flush(5001.0) == []


def test_errors_are_stored_and_fatal_ones_flagged() -> None:
    conv = p.Conversation()
    out = conv.receive(p.ServiceError("invalid_request_error", "bad_thing", "nope"), 1.0)
    assert out == [p.StoreError("invalid_request_error", "bad_thing", "nope", False)]
    out = conv.receive(p.ServiceError("insufficient_quota", "insufficient_quota", "pay"), 2.0)
    assert out[0].fatal


def test_tracking_stays_bounded_over_a_long_run() -> None:
    conv = p.Conversation()
    for n in range(1000):
        feed(conv, turn_events(f"u{n}", f"r{n}", f"a{n}", "hi", b"\x00\x00"))
    assert len(conv._replies) <= conv.MAX_TRACKED_ITEMS
    assert len(conv._commit_times) <= conv.MAX_TRACKED_ITEMS
    assert conv.responses_done == 1000


def test_first_played_latency_is_measured_from_the_end_of_speech() -> None:
    conv = p.Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Beep", b"\x00\x00" * 100), t0=100.0)
    # speech stopped at 100.1; the speaker took the first sample at 100.9
    assert conv.first_played("a1", 100.9) == [p.StoreLatency("r1", 800.0)]
    assert conv.first_played("a1", 101.0) == []  # once per reply
