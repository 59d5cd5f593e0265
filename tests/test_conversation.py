"""The Conversation state machine, synchronously: realistic server event sequences in, actions
and turn states out; conversation order (seq) and latencies from the times the test supplies."""

from __future__ import annotations

import base64
import json

import pytest
from test_protocol import CLIENT, ev

from r2d2voice.protocol import actions as a
from r2d2voice.protocol.core import End, EndReason
from r2d2voice.realtime import client_events as c
from r2d2voice.realtime.conversation import Conversation, Phase, Turn
from r2d2voice.realtime.server_events import ServiceError, SpeechStarted, parse_event


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


def feed(conv: Conversation, messages: list[str], t0: float = 1000.0) -> list[a.Action]:
    out: list[a.Action] = []
    for i, m in enumerate(messages):
        out += conv.receive(parse_event(m), t0 + i * 0.1)
    return out


def states(conv: Conversation, messages: list[str]) -> list[Turn]:
    seen = []
    for m in messages:
        conv.receive(parse_event(m), 0.0)
        seen.append(conv.turn)
    return seen


def test_a_whole_turn_yields_audio_transcripts_usage_and_latency() -> None:
    conv = Conversation()
    assert conv.phase is Phase.CONNECTING
    out = feed(conv, [ev("session.created", session={"id": "sess_1", "model": "m"})])
    assert out == [a.StoreSession("sess_1", "m")] and conv.phase is Phase.OPEN
    feed(conv, [ev("session.updated", session={"id": "sess_1"})])
    assert conv.configured
    pcm = b"\x10\x00" * 2400
    out = feed(conv, turn_events("u1", "r1", "a1", "Beep boop!", pcm), t0=2000.0)
    assert [x.pcm for x in out if isinstance(x, a.Play)] == [pcm]
    msgs = [x for x in out if isinstance(x, a.StoreMessage)]
    assert [(m.role, m.item_id, m.seq, m.text) for m in msgs] == [
        ("user", "u1", 1, "hello robot"), ("assistant", "a1", 2, "Beep boop!")]
    assert msgs[1].response_id == "r1" and '"transcript": "Beep boop!"' in msgs[1].raw
    responses = [x for x in out if isinstance(x, a.StoreResponse)]
    # one row when the response is created, its final state when it is done
    assert responses[0] == a.StoreResponse("r1", "in_progress")
    # speech stopped at +0.1 s, first audio at +0.5 s
    assert responses[1] == a.StoreResponse("r1", "completed",
                                           {"input_tokens": 10, "output_tokens": 20}, None,
                                           pytest.approx(400.0))
    assert conv.settled and conv.turns_committed == 1 and conv.responses_done == 1
    assert conv.usage_totals == {"input_tokens": 10, "output_tokens": 20}
    assert conv.received_samples("a1") == 2400


def test_turn_states_follow_the_floor() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Beep", b"\x00\x00")
    assert states(conv, msgs) == [
        Turn.USER_SPEAKING,  # speech_started
        Turn.IDLE,  # speech_stopped: nothing is open until the commit
        Turn.TRANSCRIBING,  # committed: its transcript is to come
        Turn.RESPONDING, Turn.RESPONDING, Turn.RESPONDING, Turn.RESPONDING, Turn.RESPONDING,
        Turn.RESPONDING,  # the user transcript arrives while the reply is generated
        Turn.RESPONDING,
        Turn.IDLE,  # response.done, every transcript in
    ]
    assert conv.idle and conv.settled


def test_a_reply_finishing_before_the_user_transcript_is_idle_but_not_settled() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Beep", b"\x00\x00")
    user_transcript = msgs.pop(8)
    feed(conv, msgs)
    assert conv.turn is Turn.TRANSCRIBING and conv.idle and not conv.settled
    assert list(conv.pending_user) == ["u1"]
    feed(conv, [user_transcript])
    assert conv.turn is Turn.IDLE and not conv.pending_user


def test_barge_in_keeps_the_floor_with_the_user_until_the_commit() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Long reply", b"\x00\x00" * 2400)
    feed(conv, msgs[:6])
    assert conv.turn is Turn.RESPONDING
    assert conv.receive(SpeechStarted("u2", 5000), 3000.0) == [a.UserSpeaking("u2"),
                                                                 a.BargeIn("u2")]
    assert conv.user_speaking
    # the service cancels the reply it was generating: the user still has the floor
    feed(conv, [ev("response.done", response={"id": "r1", "status": "cancelled"})])
    assert conv.turn is Turn.USER_SPEAKING and conv.active_response is None
    feed(conv, [ev("input_audio_buffer.committed", item_id="u2", previous_item_id="a1")])
    assert conv.turn is Turn.TRANSCRIBING


def test_seq_is_conversation_order_even_when_transcripts_come_late() -> None:
    conv = Conversation()
    one = turn_events("u1", "r1", "a1", "one", b"\x00\x00")
    two = turn_events("u2", "r2", "a2", "two", b"\x00\x00")
    late_one = one.pop(8)  # u1's transcript arrives after the whole second turn
    out = feed(conv, [*one, *two, late_one])
    msgs = [(m.item_id, m.seq) for m in out if isinstance(m, a.StoreMessage)]
    assert msgs == [("a1", 2), ("u2", 3), ("a2", 4), ("u1", 1)]
    # an item first seen in some other event gets the next seq then
    out = conv.receive(parse_event(ev(
        "conversation.item.input_audio_transcription.completed", item_id="u_unknown",
        content_index=0, transcript="?")), 1.0)
    assert out[0].seq == 5
    assert Conversation().seq_of("u1") is None  # per instance: a new session starts over


def test_transcription_failed_is_stored_as_an_error_and_settles_the_turn() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Beep", b"\x00\x00")
    msgs[8] = ev("conversation.item.input_audio_transcription.failed", item_id="u1",
                 content_index=0, error={"type": "transcription_error", "message": "noise"})
    out = feed(conv, msgs)
    assert a.StoreError("transcription_failed", None, "u1: noise", False) in out
    assert [m.role for m in out if isinstance(m, a.StoreMessage)] == ["assistant"]
    assert conv.settled


def test_barge_in_truncates_at_what_was_played_never_more_than_received() -> None:
    conv = Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Long reply", b"\x00\x00" * 24000))
    truncate, stored = conv.interrupted("a1", played_samples=12000)
    assert truncate == a.Send(c.ItemTruncate("a1", 500))
    assert stored == a.StoreInterrupted("a1", 2, 500)
    wire = json.loads(conv.send(truncate.event))
    assert CLIENT.validate_python(wire).type == "conversation.item.truncate"
    assert wire["audio_end_ms"] == 500 and wire["item_id"] == "a1"
    # claims of more playback than audio received are capped at what was received
    assert conv.interrupted("a1", played_samples=10**9)[1] == a.StoreInterrupted("a1", 2, 1000)
    # audio of an earlier session is not this conversation's business
    assert conv.interrupted("a_old_session", 4800) == []


def test_barge_in_before_anything_was_played_deletes_the_item() -> None:
    conv = Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "x", b"\x00\x00" * 240))
    send, stored = conv.interrupted("a1", played_samples=0)
    assert send == a.Send(c.ItemDelete("a1"))
    assert stored == a.StoreInterrupted("a1", 2, 0)
    assert conv.first_played("a1", 1e9) == []  # never heard: no latency to report


def test_cut_off_reply_keeps_its_partial_transcript() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Hello there friend", b"\x00\x00" * 10)
    cancelled = ev("response.done", response={"id": "r1", "status": "cancelled"})
    out = feed(conv, [*msgs[:8], cancelled])  # no transcript.done; the response is cancelled
    partial = [x for x in out if isinstance(x, a.StoreMessage) and x.role == "assistant"]
    assert partial == [a.StoreMessage("assistant", "a1", 2, "Hello there friend", "r1",
                                      partial=True)]
    assert conv.idle


def test_connection_lost_stores_unfinished_transcripts_and_closes() -> None:
    conv = Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Half a sent", b"")[:7])
    lost, *flushed = conv.connection_lost(1011, "close code 1011")
    assert lost == a.StoreError("connection_lost", None, "close code 1011", False)
    assert conv.end == EndReason(End.LOST, "close code 1011")
    assert [(x.role, x.text, x.partial) for x in flushed] == [("assistant", "Half ", True)]
    assert conv.phase is Phase.CLOSED and conv.settled
    assert conv.connection_lost() == []


def test_how_a_session_ended_is_decided_once() -> None:
    # we closed it: the close code that follows means nothing, nothing is stored as lost
    conv = Conversation()
    conv.finish(EndReason(End.RECYCLE))
    assert conv.connection_lost(3000, "close code 3000") == []
    assert conv.end == EndReason(End.RECYCLE)
    # a fatal close code names the last error; it is stored as fatal
    conv = Conversation()
    feed(conv, [ev("error", error={"type": "invalid_request_error", "code": "x",
                                   "message": "bad thing"})])
    (stored,) = conv.connection_lost(4000, "close code 4000")
    assert conv.end is not None and conv.end.kind is End.FATAL
    assert stored.fatal and "4000" in conv.end.detail and "bad thing" in conv.end.detail
    # session_expired: a new session at once; the lost link after it is stored, not fatal
    conv = Conversation()
    feed(conv, [ev("error", error={"type": "invalid_request_error", "code": "session_expired",
                                   "message": "expired"})])
    assert conv.end is not None and conv.end.kind is End.EXPIRED
    (stored,) = conv.connection_lost(1001, "close code 1001")
    assert conv.end.kind is End.EXPIRED and stored.type == "connection_lost"


def test_errors_are_stored_fatal_ones_flagged_and_our_event_named() -> None:
    conv = Conversation()
    out = conv.receive(ServiceError("invalid_request_error", "bad_thing", "nope"), 1.0)
    assert out == [a.StoreError("invalid_request_error", "bad_thing", "nope", False)]
    out = conv.receive(ServiceError("insufficient_quota", "insufficient_quota", "pay"), 2.0)
    assert out[0].fatal and conv.last_error is not None
    sent_id = json.loads(conv.send(c.ItemTruncate("a9", 100)))["event_id"]
    out = conv.receive(ServiceError("invalid_request_error", "item_not_found", "no a9",
                                    sent_id), 3.0)
    assert out[0].message == "no a9 (in reply to our conversation.item.truncate)"


def test_tracking_stays_bounded_over_a_long_run() -> None:
    conv = Conversation()
    for n in range(1000):
        feed(conv, turn_events(f"u{n}", f"r{n}", f"a{n}", "hi", b"\x00\x00"))
        conv.send(c.AudioAppend(b"\x00\x00"))
    bound = conv.MAX_TRACKED_ITEMS
    assert max(conv.items.tracked()) <= bound
    assert len(conv.sent) <= bound and len(conv.awaiting_play) <= bound
    assert conv.responses_done == 1000
    assert conv.seq_of("a999") == 2000


def test_first_played_latency_is_measured_from_the_end_of_speech() -> None:
    conv = Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Beep", b"\x00\x00" * 100), t0=100.0)
    # speech stopped at 100.1; the speaker took the first sample at 100.9
    assert conv.first_played("a1", 100.9) == [a.StoreLatency("r1", 800.0)]
    assert conv.first_played("a1", 101.0) == []  # once per reply


def test_a_response_without_a_speech_turn_has_no_latency() -> None:
    conv = Conversation()
    out = feed(conv, turn_events("u1", "r1", "a1", "Beep", b"\x00\x00")[3:])
    assert [x for x in out if isinstance(x, a.StoreResponse)][-1].first_audio_ms is None
    assert not conv.awaiting_play


def test_the_core_says_when_the_person_stopped_and_when_a_replys_audio_is_over() -> None:
    """``UserStopped`` at the service's speech_stopped; ``AudioDone`` once per reply that
    streamed audio, at its response.done (cancelled too) — the speaker's ``spoken`` waits for
    it, not for the queue to run dry."""
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Beep!", b"\x10\x00" * 480)
    out = feed(conv, msgs[:-1])
    assert [x for x in out if isinstance(x, (a.UserStopped, a.AudioDone))] == [
        a.UserStopped("u1")]
    assert feed(conv, msgs[-1:])[-1:] == [a.AudioDone("a1")]
    silent = ev("response.done", response={"id": "r2", "status": "completed"})
    again = feed(conv, [ev("response.created", response={"id": "r2", "status": "in_progress"}),
                        silent, msgs[-1]])
    assert not [x for x in again if isinstance(x, a.AudioDone)]  # no audio, or told already
    cut = turn_events("u2", "r3", "a3", "Hello there", b"\x10\x00" * 480)[:6]
    cancelled = ev("response.done", response={"id": "r3", "status": "cancelled"})
    assert feed(conv, [*cut, cancelled])[-1:] == [a.AudioDone("a3")]


def test_a_lost_connection_ends_the_audio_of_every_reply_still_streaming() -> None:
    conv = Conversation()
    feed(conv, turn_events("u1", "r1", "a1", "Half a sent", b"\x10\x00" * 480)[:7])
    assert conv.connection_lost(1011, "close code 1011")[-1:] == [a.AudioDone("a1")]
