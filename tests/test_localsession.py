"""The local backend's protocol logic, sans-IO: client JSON in, server events out.

No sockets, no trio, no clock: :class:`localpeer.Peer` plays the shell synchronously (it streams
a reply only when told, so a test decides what the client has heard when it speaks again), ids
come from a counter, and every event is checked against the openai SDK's schema.
"""

from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import pytest
from localpeer import (
    CHUNK,
    CHUNK_MS,
    NOW,
    Json,
    Peer,
    b64,
    first,
    pcm_of,
    turn_audio,
    types,
)
from support import RATE, espeak_pcm, silence, tone

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.localbackend.reply import Reply, synthesize
from r2d2voice.localbackend.session import CancelReply
from r2d2voice.localbackend.turns import MAX_BUFFER_BYTES, InputAudio

TRANSCRIBE = {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}


# --------------------------------------------------------------------------- a whole turn


def test_a_whole_turn_event_by_event():
    p = Peer(reply_seconds=1.5)
    created = p.events[0]
    assert created["event_id"] == "event_1"
    session = created["session"]
    assert session["id"] == "sess_1" and session["model"] == "local"  # it says what it is
    assert session["expires_at"] == int(NOW) + 3600  # from the injected clock
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    updated = p.send("session.update", session={
        "type": "realtime", "instructions": "Be R2.",
        "audio": {**TRANSCRIBE, "output": {"voice": "cedar"}}})
    session = updated[0]["session"]
    assert session["instructions"] == "Be R2." and session["audio"]["output"]["voice"] == "cedar"
    assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"

    heard = p.append(turn_audio(1.0))
    assert types(heard) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
    ]
    started, stopped, committed, added, done, transcription = heard
    assert started["audio_start_ms"] == 200  # onset 500 ms - 300 ms padding
    assert stopped["audio_end_ms"] == 1500
    assert {e["item_id"] for e in (started, stopped, committed, transcription)} == {"item_1"}
    assert committed["previous_item_id"] is None
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    assert done["item"]["content"] == [{"type": "input_audio", "transcript": "(speech, 1.0 s)"}]
    assert transcription["transcript"] == "(speech, 1.0 s)"
    assert len(p.queue) == 1  # a reply is due

    reply = p.stream()
    order = types(reply)
    assert order[:4] == ["response.created", "response.output_item.added",
                         "conversation.item.added", "response.content_part.added"]
    assert order[-6:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done",
                          "conversation.item.done", "response.done"]
    assert order.count("response.output_audio.delta") == 15  # 1.5 s in 100 ms chunks
    assert reply[0]["response"]["id"] == "resp_1"
    assert reply[0]["response"]["status"] == "in_progress"
    assistant = reply[1]["item"]
    assert assistant["id"] == "item_2" and assistant["role"] == "assistant"
    assert reply[2]["previous_item_id"] == "item_1"
    assert all(e["response_id"] == "resp_1" for e in reply if "response_id" in e)

    audio = np.frombuffer(pcm_of(reply), "<i2")
    assert len(audio) == round(1.5 * RATE)
    assert 20 * np.log10(np.abs(audio).max() / 32768) == pytest.approx(-12, abs=0.1)
    deltas = "".join(e["delta"] for e in reply
                     if e["type"] == "response.output_audio_transcript.delta")
    final = first(reply, "response.output_audio_transcript.done")["transcript"]
    assert deltas == final and "R2 answers in beeps" in final
    response = reply[-1]["response"]
    assert response["status"] == "completed" and response["conversation_id"] == "conv_1"
    assert response["output"][0]["content"][0]["transcript"] == final
    assert response["audio"]["output"]["voice"] == "cedar"
    usage = response["usage"]
    assert usage["input_token_details"]["audio_tokens"] == (1500 - 200) * 10 // 1000
    assert usage["input_token_details"]["text_tokens"] == len("Be R2.") // 4
    assert usage["output_token_details"] == {"audio_tokens": 30, "text_tokens": len(final) // 4}
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"]

    ids = [e["event_id"] for e in p.events]
    assert ids == [f"event_{n}" for n in range(1, len(ids) + 1)]
    assert p.session.active is None


def test_real_speech_is_one_turn_with_its_length(tmp_path):
    speech = espeak_pcm("Hello R2, what is the weather like on Tatooine today?", tmp_path)
    p = Peer()
    p.send("session.update", session={"type": "realtime", "audio": TRANSCRIBE})
    events = p.append(np.concatenate([silence(0.5), speech, silence(1.0)]))
    assert types(events).count("input_audio_buffer.speech_started") == 1
    said = first(events, "conversation.item.input_audio_transcription.completed")["transcript"]
    voiced = np.flatnonzero(np.abs(speech) > 300)
    seconds = (voiced[-1] - voiced[0]) / RATE
    assert float(said.removeprefix("(speech, ").removesuffix(" s)")) == pytest.approx(
        seconds, abs=0.25)
    assert p.stream()[-1]["response"]["status"] == "completed"


def test_one_big_append_is_one_turn():
    p = Peer()
    p.send("input_audio_buffer.append", audio=b64(np.concatenate([turn_audio(1.0), silence(7.5)])))
    assert "input_audio_buffer.speech_stopped" in types(p.events) and len(p.queue) == 1


def test_same_input_same_reply_and_different_input_different_reply():
    def reply_for(pcm: np.ndarray) -> tuple[bytes, str]:
        p = Peer()
        p.append(pcm)
        events = p.stream()
        return pcm_of(events), first(events, "response.output_audio_transcript.done")["transcript"]

    reply = reply_for(turn_audio(1.0, 440))
    assert reply_for(turn_audio(1.0, 440)) == reply
    assert reply_for(turn_audio(1.2, 660))[0] != reply[0]


def test_beeps_are_deterministic_and_at_a_comfortable_level():
    audio, text = r2_reply(b"turn", 2.0)
    again, text_again = r2_reply(b"turn", 2.0)
    assert np.array_equal(audio, again) and text == text_again
    assert audio.dtype == np.int16 and len(audio) == 2 * RATE
    assert 20 * np.log10(np.abs(audio).max() / 32768) == pytest.approx(-12, abs=0.1)
    assert text.startswith("*") and "no speech understanding" in text
    assert not np.array_equal(audio, r2_reply(b"other turn", 2.0)[0])
    assert len(r2_reply(3, 0.5, rate=16000)[0]) == 8000
    # The backend's cached synthesis: the same PCM16 bytes, made once.
    assert synthesize(b"turn", 2.0) == (audio.astype("<i2").tobytes(), text)
    assert synthesize(b"turn", 2.0) is synthesize(b"turn", 2.0)


# --------------------------------------------------------------------------- interruption


def test_speech_during_a_reply_cancels_it_and_the_new_turn_is_answered():
    p = Peer(reply_seconds=6.0)
    p.append(turn_audio(0.6))
    p.stream(chunks=3)  # the client has 300 ms of the reply
    events = p.append(tone(0.3, freq=600))
    order = types(events)
    assert order[0] == "input_audio_buffer.speech_started"
    assert order[1:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                         "response.content_part.done", "response.output_item.done",
                         "conversation.item.done", "response.done"]
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert response["output"][0]["status"] == "incomplete"
    sent = [e for e in p.events if e.get("response_id") == response["id"]]
    assert len(pcm_of(sent)) == 3 * CHUNK * 2
    assert response["usage"]["output_token_details"]["audio_tokens"] == 3 * CHUNK * 20 // RATE
    partial = "".join(e["delta"] for e in sent
                      if e["type"] == "response.output_audio_transcript.delta")
    assert first(events, "response.output_audio_transcript.done")["transcript"] == partial
    item = p.send("conversation.item.retrieve", item_id=response["output"][0]["id"])[0]["item"]
    assert item["status"] == "incomplete"

    second = p.append(silence(0.7))
    assert "input_audio_buffer.speech_stopped" in types(second) and len(p.queue) == 1
    done = p.stream()
    assert done[-1]["response"]["status"] == "completed"
    assert len(pcm_of(done)) == 6 * RATE * 2


def test_no_interruption_when_interrupt_response_is_off():
    p = Peer(reply_seconds=3.0)
    p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "interrupt_response": False}}}})
    p.append(turn_audio(0.6))
    p.stream(chunks=3)
    events = p.append(np.concatenate([tone(0.3, freq=600), silence(0.7)]))
    assert "input_audio_buffer.speech_started" in types(events)
    assert "response.done" not in types(events)
    assert len(p.queue) == 1  # the turn ends while the reply is active: no second reply
    done = p.stream()
    assert done[-1]["response"]["status"] == "completed"
    assert len(pcm_of(p.events)) == 3 * RATE * 2


def test_no_reply_when_create_response_is_off():
    p = Peer()
    p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "create_response": False}}}})
    events = p.append(turn_audio(0.6))
    assert "input_audio_buffer.committed" in types(events) and p.queue == []


def test_a_reply_cancelled_before_it_streams_is_created_and_done():
    p = Peer()
    p.send("response.create")
    events = p.send("response.cancel")
    assert types(events) == ["response.created", "response.done"]
    response = events[-1]["response"]
    assert response["status"] == "cancelled" and response["output"] == []
    assert response["id"] == events[0]["response"]["id"] and p.queue == []


@pytest.mark.parametrize(("opened", "closing"), [
    (2, ["response.output_item.done", "response.done"]),
    (3, ["response.output_item.done", "conversation.item.done", "response.done"]),
])
def test_a_reply_cancelled_mid_opening_closes_what_was_opened(opened, closing):
    p = Peer()
    [reply] = p.session.receive(json.dumps({"type": "response.create"}))
    assert isinstance(reply, Reply)
    steps = reply.steps(synthesize(reply.seed, reply.seconds), CHUNK_MS)
    for event in [*reply.opening(), *itertools.islice(steps, opened - 1)]:
        reply.sent(event)
    [cancel] = p.session.receive(json.dumps({"type": "response.cancel"}))
    assert cancel == CancelReply(reply)
    events = reply.closing()
    assert types(events) == closing
    assert events[0]["item"] == {"id": reply.item_id, "object": "realtime.item",
                                 "type": "message", "status": "incomplete",
                                 "role": "assistant", "content": []}


# --------------------------------------------------------------------------- control events


def test_truncate_delete_create_retrieve():
    p = Peer()
    p.send("response.create", response={"metadata": {"why": "test"}})
    response = p.stream()[-1]["response"]
    assert response["status"] == "completed" and response["metadata"] == {"why": "test"}
    assistant = response["output"][0]["id"]
    [retrieved] = p.send("conversation.item.retrieve", item_id=assistant)
    assert retrieved["item"]["content"][0]["type"] == "output_audio"
    assert retrieved["item"]["content"][0]["transcript"]

    [truncated] = p.send("conversation.item.truncate", item_id=assistant, content_index=0,
                         audio_end_ms=400, event_id="evt_t")
    assert truncated == {**truncated, "type": "conversation.item.truncated",
                         "item_id": assistant, "content_index": 0, "audio_end_ms": 400}
    # Like the service: the transcript of unheard audio leaves the context.
    [retrieved] = p.send("conversation.item.retrieve", item_id=assistant)
    assert retrieved["item"]["content"][0]["transcript"] is None
    # Beyond the (now 400 ms) audio, an unknown item, a user item: errors naming the event.
    for body, param, code in (
        ({"item_id": assistant, "audio_end_ms": 900}, "audio_end_ms", "invalid_value"),
        ({"item_id": "item_nope", "audio_end_ms": 0}, "item_id", "item_truncate_invalid_item_id"),
        ({"item_id": assistant, "audio_end_ms": -1}, "audio_end_ms", "invalid_value"),
        ({"item_id": assistant, "audio_end_ms": 0, "content_index": 1}, "content_index",
         "invalid_value"),
    ):
        [error] = p.send("conversation.item.truncate", event_id="evt_bad", **body)
        assert error["type"] == "error"
        assert (error["error"]["event_id"], error["error"]["param"], error["error"]["code"]) == (
            "evt_bad", param, code)

    added, done = p.send("conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What is the time?"}]})
    assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
    user = added["item"]
    assert user["id"] == "item_2" and user["role"] == "user"
    assert user["content"] == [{"type": "input_text", "text": "What is the time?"}]
    assert added["previous_item_id"] == assistant
    [error] = p.send("conversation.item.truncate", item_id=user["id"], audio_end_ms=0)
    assert error["error"]["code"] == "item_truncate_invalid_item_id"

    added, _ = p.send("conversation.item.create", previous_item_id="root", item={
        "id": "item_sys", "type": "message", "role": "system",
        "content": [{"type": "input_text", "text": "Context from a previous session."}]})
    assert added["item"]["id"] == "item_sys" and added["previous_item_id"] is None
    for item, previous, code in (
        ({"type": "message", "role": "robot", "content": [{"type": "input_text"}]}, None,
         "invalid_value"),
        ({"id": "item_sys", "type": "message", "role": "system",
          "content": [{"type": "input_text", "text": "again"}]}, None,
         "item_create_duplicate_id"),
        ({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
         "item_nope", "item_create_invalid_previous_item_id"),
    ):
        [error] = p.send("conversation.item.create", item=item, previous_item_id=previous)
        assert error["type"] == "error" and error["error"]["code"] == code

    # The text items now count in the next response's input.
    p.send("response.create")
    usage = p.stream()[-1]["response"]["usage"]
    expected_text = (len("You are R2-D2. You answer in beeps and whistles.") // 4
                     + len("What is the time?") // 4
                     + len("Context from a previous session.") // 4)
    assert usage["input_token_details"]["text_tokens"] == expected_text

    [deleted] = p.send("conversation.item.delete", item_id=user["id"])
    assert deleted["type"] == "conversation.item.deleted" and deleted["item_id"] == user["id"]
    [error] = p.send("conversation.item.delete", item_id=user["id"])
    assert error["error"]["code"] == "item_delete_invalid_item_id"
    [error] = p.send("conversation.item.retrieve", item_id=user["id"])
    assert error["error"]["code"] == "item_retrieve_invalid_item_id"


def test_response_cancel_and_one_response_at_a_time():
    p = Peer(reply_seconds=5.0)
    [error] = p.send("response.cancel", event_id="evt_1")
    assert error["error"]["event_id"] == "evt_1"
    assert error["error"]["code"] == "response_cancel_not_active"

    p.send("response.create")
    p.stream(chunks=2)
    [error] = p.send("response.create")
    assert error["error"]["code"] == "conversation_already_has_active_response"
    [error] = p.send("response.cancel", response_id="resp_other")
    assert error["error"]["code"] == "response_cancel_not_active"
    events = p.send("response.cancel", response_id="resp_1")
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"]["reason"] == "client_cancelled"
    assert len(pcm_of(p.events)) == 2 * CHUNK * 2
    p.send("response.create")  # the next one may start now
    assert p.stream()[-1]["response"]["status"] == "completed"


def test_manual_turns_commit_and_clear():
    p = Peer()
    [updated] = p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": None, "transcription": {"model": "whisper-1"}}}})
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    [error] = p.send("input_audio_buffer.commit", event_id="evt_c")
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "evt_c"

    assert p.append(turn_audio(1.0)) == []  # no VAD: no speech events, no reply
    events = p.send("input_audio_buffer.commit")
    assert types(events) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert events[-1]["transcript"] == "(speech, 2.5 s)"  # the whole buffer
    assert p.queue == []

    p.append(tone(0.5))
    assert types(p.send("input_audio_buffer.clear")) == ["input_audio_buffer.cleared"]
    [error] = p.send("input_audio_buffer.commit")
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    p.send("response.create")
    assert p.stream()[-1]["response"]["status"] == "completed"


def test_a_manual_commit_during_a_vad_turn_takes_its_item_id():
    p = Peer()
    started = p.append(np.concatenate([silence(0.5), tone(0.5)]))
    assert types(started) == ["input_audio_buffer.speech_started"]
    committed = p.send("input_audio_buffer.commit")[0]
    assert committed["item_id"] == started[0]["item_id"]
    assert p.append(silence(1.0)) == []  # the turn ended with the commit


# --------------------------------------------------------------------------- bad input


def test_bad_client_messages_get_errors_and_the_session_goes_on():
    p = Peer()
    for frame in ("{not json", b"\x00\x01", "[1, 2]"):
        [error] = p.raw(frame)
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["code"] == "invalid_json"

    [error] = p.send("conversation.item.teleport", event_id="evt_x")
    assert error["error"]["event_id"] == "evt_x" and error["error"]["param"] == "type"
    for audio in ("@@not base64@@", base64.b64encode(b"odd").decode(), 7):
        [error] = p.send("input_audio_buffer.append", audio=audio, event_id="evt_a")
        assert error["error"]["event_id"] == "evt_a" and error["error"]["param"] == "audio"
    [error] = p.send("output_audio_buffer.clear")
    assert error["error"]["code"] == "unsupported"
    [error] = p.send("response.create", response={"output_modalities": ["text"]})
    assert error["error"]["param"] == "response.output_modalities"
    assert p.queue == []


TD = "session.audio.input.turn_detection"


@pytest.mark.parametrize(("session", "param"), [
    ({"instructions": "no type"}, "session.type"),
    ({"type": "transcription"}, "session.type"),
    ({"type": "realtime", "colour": "blue"}, "session.colour"),
    ({"type": "realtime", "instructions": 7}, "session.instructions"),
    ({"type": "realtime", "output_modalities": ["text"]}, "session.output_modalities"),
    ({"type": "realtime", "audio": []}, "session.audio"),
    ({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
     "session.audio.input.format"),
    ({"type": "realtime", "audio": {"input": {"transcription": "yes"}}},
     "session.audio.input.transcription"),
    ({"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                  "threshold": 7}}}},
     f"{TD}.threshold"),
    ({"type": "realtime", "audio": {"input": {"turn_detection": {"type": "loud_vad"}}}},
     f"{TD}.type"),
    ({"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "silence_duration_ms": -1}}}}, f"{TD}.silence_duration_ms"),
    ({"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "interrupt_response": "yes"}}}}, f"{TD}.interrupt_response"),
    ({"type": "realtime", "audio": {"output": {"speed": 3}}}, "session.audio.output.speed"),
    ({"type": "realtime", "audio": {"output": {"voice": 7}}}, "session.audio.output.voice"),
])
def test_a_rejected_session_update_names_the_parameter_and_changes_nothing(session, param):
    p = Peer()
    before = json.dumps(p.session.session)
    [error] = p.send("session.update", session=session, event_id="evt_u")
    assert error["type"] == "error" and error["error"]["event_id"] == "evt_u"
    assert error["error"]["param"] == param
    assert json.dumps(p.session.session) == before


def test_turn_detection_updates_merge_and_retune_the_vad():
    paused = np.concatenate([silence(0.5), tone(0.5), silence(0.3), tone(0.5), silence(1.0)])
    p = Peer()
    [updated] = p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 200}}}})
    td = updated["session"]["audio"]["input"]["turn_detection"]
    assert td["silence_duration_ms"] == 200 and td["threshold"] == 0.5
    stops = [e for e in p.append(paused) if e["type"] == "input_audio_buffer.speech_stopped"]
    assert [e["audio_end_ms"] for e in stops] == [1000, 1800]  # the 300 ms pause ends a turn

    [updated] = p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}})
    td = updated["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "semantic_vad" and td["eagerness"] == "auto" and "threshold" not in td
    # semantic_vad runs as the energy VAD with the server_vad defaults (500 ms of silence);
    # the VAD's clock restarts at the update but times stay on the session's stream.
    stops = [e for e in p.append(paused) if e["type"] == "input_audio_buffer.speech_stopped"]
    assert [e["audio_end_ms"] for e in stops] == [2800 + 1800]


def test_the_observer_sees_every_json_client_event():
    seen: list[tuple[str, Json]] = []
    p = Peer(observer=lambda sid, event: seen.append((sid, event)))
    p.raw("{not json")
    p.send("response.create", event_id="evt_1")
    assert seen == [("sess_1", {"type": "response.create", "event_id": "evt_1"})]


# --------------------------------------------------------------------------- the input buffer


def test_the_input_buffer_keeps_at_most_15_mib_and_counts_what_it_drops():
    buffer = InputAudio(None)  # manual turns: everything is kept up to the cap
    buffer.append(bytes(MAX_BUFFER_BYTES - 4800))
    assert buffer.dropped_samples == 0
    buffer.append(bytes(9600))
    assert buffer.samples == MAX_BUFFER_BYTES // 2 and buffer.dropped_samples == 2400


def test_outside_a_turn_only_the_prefix_padding_is_kept():
    buffer = InputAudio({"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500})
    buffer.append(silence(5.0).tobytes())
    assert buffer.samples == (300 + 500) * RATE // 1000
