"""The tool loop and the service's habits in the sans-IO Conversation, synchronously: function
calls (streamed arguments, run only from a completed response, outputs back, one
response.create, the retry, the hang-up after the goodbye), the idle-timeout nudge, audio of a
cancelled reply, benign errors and late transcripts."""

from __future__ import annotations

import base64
import json

from test_conversation import feed, turn_events
from test_protocol import CLIENT, ev

from r2d2voice.protocol import actions as a
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime import client_events as c
from r2d2voice.realtime.conversation import Conversation, Turn
from r2d2voice.realtime.server_events import parse_event

ARGS = '{\n  "degrees": -90\n}'


def call_events(resp: str, call_id: str, *, name: str = "turn_head", args: str = ARGS,
                item: str | None = None, status: str = "completed", done: bool = True,
                details: dict | None = None, created: bool = True) -> list[str]:
    """A response that calls ``name``: arguments in three deltas, then (if ``done``) final."""
    item = item or f"fc_{call_id}"
    third = max(1, len(args) // 3)
    out = [ev("response.created", response={"id": resp, "status": "in_progress"})] \
        if created else []
    out.append(ev("response.output_item.added", response_id=resp, output_index=0, item={
        "id": item, "type": "function_call", "name": name, "call_id": call_id,
        "arguments": "", "status": "in_progress"}))
    out += [ev("response.function_call_arguments.delta", response_id=resp, item_id=item,
               output_index=0, call_id=call_id, delta=args[i:i + third])
            for i in range(0, len(args), third)]
    if done:
        out.append(ev("response.function_call_arguments.done", response_id=resp, item_id=item,
                      output_index=0, call_id=call_id, name=name, arguments=args))
    out.append(ev("response.done", response={"id": resp, "status": status,
                                             "status_details": details}))
    return out


def reply_events(resp: str, item: str, text: str = "ok", status: str = "completed") -> list[str]:
    return [
        ev("response.created", response={"id": resp, "status": "in_progress"}),
        ev("response.output_item.added", response_id=resp, output_index=0,
           item={"id": item, "type": "message", "role": "assistant", "content": []}),
        ev("response.output_audio.delta", response_id=resp, item_id=item, output_index=0,
           content_index=0, delta=base64.b64encode(b"\x01\x00" * 240).decode()),
        ev("response.output_audio_transcript.done", response_id=resp, item_id=item,
           output_index=0, content_index=0, transcript=text),
        ev("response.done", response={"id": resp, "status": status}),
    ]


def sends(out: list[a.Action]) -> list[c.ClientEvent]:
    return [x.event for x in out if isinstance(x, a.Send)]


def ran(out: list[a.Action]) -> list[a.CallTool]:
    return [x for x in out if isinstance(x, a.CallTool)]


def result(call_id: str, output: str = "turned to -90", status: str = "ok") -> StoreToolResult:
    return StoreToolResult(call_id, status, output, 0, 41.0)


def test_a_call_runs_once_its_response_completed_and_its_output_goes_back() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Turning", b"\x00\x00")[:3]  # the user's turn
    msgs += call_events("r1", "call_1", item="fc_1")
    out = feed(conv, msgs[:-1])  # everything up to response.done
    # recorded when the arguments are final (whitespace and newlines as sent), not run yet
    assert [x for x in out if isinstance(x, StoreToolCall)] == [
        StoreToolCall("call_1", "fc_1", "r1", 2, "turn_head", ARGS)]
    assert not ran(out) and conv.turn is Turn.RESPONDING
    out = feed(conv, msgs[-1:])
    assert ran(out) == [a.CallTool("call_1", "turn_head", ARGS, "r1", 2)]
    assert conv.turn is Turn.ACTING and not conv.idle and not conv.settled
    assert conv.tools.running == ["turn_head"]

    out = conv.tool_finished(result("call_1"))
    assert out[0] == result("call_1")  # the audit row's result first
    assert sends(out) == [c.ItemCreateFunctionOutput("call_1", "turned to -90"),
                          c.ResponseCreate()]
    for event in sends(out):  # what goes on the wire is GA-valid
        assert CLIENT.validate_python(json.loads(conv.send(event)))
    assert conv.turn is Turn.RESPONDING  # the answer to the output is due
    feed(conv, reply_events("r2", "a2", "I turned my head."))
    assert conv.turn is Turn.TRANSCRIBING and conv.seq_of("a2") == 3  # u1 transcript due
    assert conv.tool_finished(result("call_1")) == [result("call_1")]  # once only


def test_calls_of_a_response_that_did_not_complete_never_run() -> None:
    conv = Conversation()
    failed = {"type": "failed", "error": {"type": "tokens", "code": "rate_limit_exceeded"}}
    out = feed(conv, call_events("r1", "call_1", status="failed", details=failed))
    assert not ran(out)
    assert [x for x in out if isinstance(x, StoreToolResult)] == [StoreToolResult(
        "call_1", "rejected", "not run: the response ended failed (rate_limit_exceeded)")]
    # cut while its arguments streamed: recorded with what came, rejected, never run
    cancelled = {"type": "cancelled", "reason": "turn_detected"}
    out = feed(conv, call_events("r2", "call_2", done=False, status="cancelled",
                                 details=cancelled))
    [call] = [x for x in out if isinstance(x, StoreToolCall)]
    assert call.call_id == "call_2" and ARGS.startswith(call.arguments) and call.arguments
    assert [(x.status, x.output) for x in out if isinstance(x, StoreToolResult)] == [
        ("rejected", "not run: the response ended cancelled (turn_detected)")]
    assert not ran(out) and conv.settled and not sends(out)


def test_two_calls_of_one_response_are_answered_with_one_response_create() -> None:
    conv = Conversation()
    msgs = call_events("r1", "call_1")[:-1] + call_events("r1", "call_2", name="get_time",
                                                          args="{}", created=False)
    out = feed(conv, msgs)
    assert [x.call_id for x in ran(out)] == ["call_1", "call_2"]
    assert sends(conv.tool_finished(result("call_2", "12:00"))) == \
        [c.ItemCreateFunctionOutput("call_2", "12:00")]
    assert conv.turn is Turn.ACTING  # turn_head still runs
    assert sends(conv.tool_finished(result("call_1"))) == [
        c.ItemCreateFunctionOutput("call_1", "turned to -90"), c.ResponseCreate()]


def test_the_response_create_waits_while_another_response_is_active() -> None:
    conv = Conversation()
    feed(conv, call_events("r1", "call_1"))
    feed(conv, reply_events("r2", "a2")[:2])  # a reply to something else is under way
    out = conv.tool_finished(result("call_1"))
    assert sends(out) == [c.ItemCreateFunctionOutput("call_1", "turned to -90")]
    out = feed(conv, reply_events("r2", "a2")[2:])
    assert sends(out) == [c.ResponseCreate()]  # once r2 is done


def test_already_active_response_waits_for_it_and_retries_once() -> None:
    conv = Conversation()
    feed(conv, call_events("r1", "call_1"))
    [create] = sends(conv.tool_finished(result("call_1")))[1:]
    first_id = json.loads(conv.send(create))["event_id"]
    # the service's VAD started a reply for the user first: ours is refused
    feed(conv, reply_events("r2", "a2")[:1])
    busy = ev("error", error={"type": "invalid_request_error",
                              "code": "conversation_already_has_active_response",
                              "message": "Conversation already has an active response",
                              "event_id": first_id})
    out = feed(conv, [busy])
    assert [type(x) for x in out] == [a.Notice]  # benign: logged, not stored as an error
    out = feed(conv, reply_events("r2", "a2")[1:])
    assert sends(out) == [c.ResponseCreate()]  # retried when the active one was done
    retry_id = json.loads(conv.send(c.ResponseCreate()))["event_id"]
    feed(conv, reply_events("r3", "a3")[:1])
    feed(conv, [busy.replace(first_id, retry_id)])
    out = feed(conv, reply_events("r3", "a3")[1:])
    assert sends(out) == [] and conv.settled  # only once


def test_end_conversation_hangs_up_after_the_goodbye_unless_talked_over() -> None:
    conv = Conversation()
    feed(conv, call_events("r1", "call_1", name="end_conversation", args="{}"))
    out = conv.tool_finished(result("call_1", "ok: say a short goodbye"), hang_up=True)
    assert sends(out)[-1] == c.ResponseCreate()
    out = feed(conv, reply_events("r2", "a2", "Goodbye!"))
    assert out[-1] == a.HangUp()
    # the user talking over the goodbye calls the hang-up off
    conv = Conversation()
    feed(conv, call_events("r1", "call_1", name="end_conversation", args="{}"))
    conv.tool_finished(result("call_1", "ok"), hang_up=True)
    out = feed(conv, reply_events("r2", "a2", "Good", status="cancelled"))
    assert a.HangUp() not in out


def test_a_running_tool_survives_barge_in_and_a_lost_connection_only_records() -> None:
    conv = Conversation()
    feed(conv, call_events("r1", "call_1"))
    feed(conv, [ev("input_audio_buffer.speech_started", item_id="u2", audio_start_ms=0)])
    # the output still goes back, but no response.create while the user speaks: the response
    # the service makes for their turn answers it
    out = conv.tool_finished(result("call_1"))
    assert sends(out) == [c.ItemCreateFunctionOutput("call_1", "turned to -90")]
    out = feed(conv, turn_events("u2", "r2", "a2", "Sure", b"\x00\x00")[1:])
    assert not sends(out) and conv.settled
    # a result for a session that is gone is recorded, nothing is sent
    conv = Conversation()
    feed(conv, call_events("r1", "call_1"))
    conv.connection_lost()
    assert conv.tool_finished(result("call_1")) == [result("call_1")]


def test_the_idle_nudge_is_no_utterance_and_its_reply_has_no_latency() -> None:
    conv = Conversation()
    out = feed(conv, [
        ev("input_audio_buffer.speech_stopped", item_id="u0", audio_end_ms=100),
        ev("input_audio_buffer.timeout_triggered", item_id="u1", audio_start_ms=100,
           audio_end_ms=5100),
        ev("input_audio_buffer.committed", item_id="u1", previous_item_id="sys_1"),
        ev("conversation.item.input_audio_transcription.completed", item_id="u1",
           content_index=0, transcript=""),
        *reply_events("r1", "a1", "Are you still there?"),
    ])
    stored = [x for x in out if isinstance(x, a.StoreMessage)]
    assert [(m.role, m.text) for m in stored] == [("assistant", "Are you still there?")]
    assert conv.turns_committed == 0 and conv.settled
    done = [x for x in out if isinstance(x, a.StoreResponse)][-1]
    assert done.first_audio_ms is None and not conv.awaiting_play


def test_audio_of_a_cancelled_reply_is_never_played() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Long reply", b"\x00\x00" * 2400)
    feed(conv, msgs[:6])
    assert conv.receive(parse_event(ev("input_audio_buffer.speech_started", item_id="u2",
                                       audio_start_ms=5000)), 3.0) == [a.UserSpeaking("u2"),
                                                                      a.BargeIn("u2")]
    conv.interrupted("a1", 1200)
    leftover = msgs[5]  # more audio of r1 after the cancel
    out = feed(conv, [leftover, leftover])
    assert not [x for x in out if isinstance(x, a.Play)] and conv.leftover_deltas == 2
    assert conv.received_samples("a1") == 2400  # the truncate stays within what it holds
    # a reply that was never played is dropped as a whole once the service cancels it
    conv = Conversation()
    feed(conv, msgs[:5])  # r1 created, no audio yet
    feed(conv, [ev("input_audio_buffer.speech_started", item_id="u2", audio_start_ms=1)])
    assert not [x for x in feed(conv, msgs[5:6]) if isinstance(x, a.Play)]
    # but with interrupt_response off the service keeps replying: it is played
    conv = Conversation(c.SessionConfig("x", interrupt_response=False))
    feed(conv, msgs[:5])
    feed(conv, [ev("input_audio_buffer.speech_started", item_id="u2", audio_start_ms=1)])
    assert [x for x in feed(conv, msgs[5:6]) if isinstance(x, a.Play)]


def test_benign_errors_are_not_errors() -> None:
    conv = Conversation()
    benign = [
        ("response_cancel_not_active", "Cancellation failed: no active response found."),
        ("input_audio_buffer_commit_empty", "buffer too small"),
        ("conversation_already_has_active_response", "already has an active response"),
        ("invalid_value", "Audio content of 900ms is already shorter than 1200ms."),
    ]
    for code, message in benign:
        out = feed(conv, [ev("error", error={"type": "invalid_request_error", "code": code,
                                              "message": message})])
        # said in the log, never stored, not the last error
        assert out == [a.Notice(f"service: {message} ({code}), going on")], code
        assert conv.last_error is None and conv.benign_errors == benign.index((code, message)) + 1
    out = feed(conv, [ev("error", error={"type": "server_error", "code": None,
                                          "message": "boom"})])
    assert out == [a.StoreError("server_error", None, "boom", False)]


def test_a_transcript_given_up_on_settles_and_still_keeps_its_place_when_late() -> None:
    conv = Conversation()
    msgs = turn_events("u1", "r1", "a1", "Beep", b"\x00\x00")
    late = msgs.pop(8)
    feed(conv, msgs)
    assert conv.turn is Turn.TRANSCRIBING
    assert conv.give_up_transcripts() == ["u1"] and conv.settled
    [stored] = feed(conv, [late])
    assert (stored.role, stored.seq, stored.text) == ("user", 1, "hello robot")
