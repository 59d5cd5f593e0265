"""The real service's habits, imitated by the local backend's switches (``Faults``): sans-IO
through :class:`localpeer.Peer`, and the shell's waiting logic over in-memory websockets on
trio's MockClock. Every event is checked against the openai SDK's schema."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
import trio
import trio_websocket
from localpeer import CHUNK, NOW, Peer, first, pcm_of, turn_audio, types
from localwire import in_memory
from support import RATE, silence, tone

from r2d2voice.localbackend.command import BackendOptionError, backend_config
from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.fault_options import FaultError, parse_faults
from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.reply import synthesize

TRANSCRIBE = {"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def peer(**faults: object) -> Peer:
    p = Peer(faults=Faults(**faults))  # type: ignore[arg-type]
    p.send("session.update", session=TRANSCRIBE)
    return p


# --------------------------------------------------------------------------- transcription


def test_by_default_the_transcript_comes_with_the_commit():
    p = peer()
    heard = types(p.append(turn_audio(1.0)))
    assert heard[-2:] == ["conversation.item.done", COMPLETED] and DELTA not in heard


def test_a_transcript_after_the_reply_starts():
    p = peer(transcript_delay="after_reply_start")
    heard = p.append(turn_audio(1.0))
    assert COMPLETED not in types(heard)
    done = first(heard, "conversation.item.done")
    assert done["item"]["content"][0]["transcript"] is None  # done before it is transcribed
    deltas = [e for e in heard if e["type"] == DELTA]
    assert "".join(e["delta"] for e in deltas) == "(speech, 1.0 s)"
    assert types(heard).index(DELTA) > types(heard).index("conversation.item.done")
    reply = p.stream()
    order = types(reply)
    assert order.index(COMPLETED) == order.index("response.created") + 1
    assert first(reply, COMPLETED)["item_id"] == done["item"]["id"]
    [retrieved] = p.send("conversation.item.retrieve", item_id=done["item"]["id"])
    assert retrieved["item"]["content"][0]["transcript"] == "(speech, 1.0 s)"


def test_a_transcript_after_the_response_is_done_even_if_cancelled():
    p = Peer(reply_seconds=5.0, faults=Faults(transcript_delay="after_response_done"))
    p.send("session.update", session=TRANSCRIBE)
    p.append(turn_audio(1.0))
    p.stream(chunks=2)
    events = p.append(tone(0.3, freq=600))  # barge-in: the reply ends cancelled
    order = types(events)
    assert order[-1] == COMPLETED and order[-2] == "response.done"
    assert events[-2]["response"]["status"] == "cancelled"


def test_a_transcript_after_some_seconds_is_left_to_the_shells_timer():
    p = peer(transcript_delay=2.5)
    assert COMPLETED not in types(p.append(turn_audio(1.0)))
    assert [later.delay_s for later in p.later] == [2.5]
    assert COMPLETED not in types(p.stream())
    assert types(p.flush_later()) == [COMPLETED]


@pytest.mark.parametrize(("outcome", "late"), [
    ("failed", ["conversation.item.input_audio_transcription.failed"]),
    ("empty", [COMPLETED]),
    ("never", []),
])
def test_a_transcript_that_fails_is_empty_or_never_comes(outcome, late):
    p = peer(transcript_delay="after_response_done", transcript_outcome=outcome)
    heard = p.append(turn_audio(1.0))
    assert DELTA not in types(heard)  # nothing was understood
    reply = p.stream()
    tail = reply[reply.index(first(reply, "response.done")) + 1:]
    assert types(tail) == late
    if outcome == "empty":
        assert tail[0]["transcript"] == ""
    if outcome == "failed":
        assert tail[0]["error"]["code"] and tail[0]["item_id"] == heard[-2]["item"]["id"]
    # At once (no delay) the outcome comes where .completed would.
    p = peer(transcript_outcome=outcome)
    heard = p.append(turn_audio(1.0))
    assert types(heard)[types(heard).index("conversation.item.done") + 1:] == late


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize(("kind", "status", "reason"), [
    ("max_output_tokens", "incomplete", "max_output_tokens"),
    ("content_filter", "incomplete", "content_filter"),
    ("turn_detected", "cancelled", "turn_detected"),
])
def test_a_chosen_response_is_cut_halfway(kind, status, reason):
    p = Peer(reply_seconds=1.0, faults=Faults(fail_responses=((2, kind),)))
    p.send("response.create")
    assert p.stream()[-1]["response"]["status"] == "completed"  # response 1: untouched
    p.send("response.create")
    events = p.stream()
    response = events[-1]["response"]
    assert response["status"] == status
    assert response["status_details"] == {"type": status, "reason": reason}
    assert len(pcm_of(events)) == 5 * CHUNK * 2  # half of the ten chunks
    assert response["output"][0]["status"] == "incomplete"
    assert types(events)[-6:] == [
        "response.output_audio.done", "response.output_audio_transcript.done",
        "response.content_part.done", "response.output_item.done", "conversation.item.done",
        "response.done"]
    p.send("response.create")
    assert p.stream()[-1]["response"]["status"] == "completed"  # response 3: untouched


def test_a_failed_response_streams_nothing_and_says_why():
    p = Peer(faults=Faults(fail_responses=((1, "failed"),)))
    p.send("response.create")
    events = p.stream()
    assert types(events) == ["response.created", "response.done"]
    response = events[-1]["response"]
    assert response["status"] == "failed" and response["output"] == []
    error = response["status_details"]["error"]
    assert response["status_details"]["type"] == "failed"
    assert error["code"] == "rate_limit_exceeded" and "Rate limit" in error["message"]
    assert p.session.active is None


def test_leftover_audio_after_a_barge_in_is_not_in_the_item():
    p = Peer(reply_seconds=6.0, faults=Faults(leftover_audio_deltas=3))
    p.append(turn_audio(0.6))
    p.stream(chunks=4)
    events = p.append(tone(0.3, freq=600))
    order = types(events)
    assert order[0] == "input_audio_buffer.speech_started"
    assert order[1:4] == ["response.output_audio.delta"] * 3
    assert order[4:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                         "response.content_part.done", "response.output_item.done",
                         "conversation.item.done", "response.done"]
    response = events[-1]["response"]
    received = pcm_of([e for e in p.events if e.get("response_id") == response["id"]])
    assert len(received) == 7 * CHUNK * 2  # 4 before the cancel, 3 after
    assert response["usage"]["output_token_details"]["audio_tokens"] == 4 * CHUNK * 20 // RATE
    # The service's benign error: a truncate at what the client received is too long.
    played_ms = len(received) // 2 * 1000 // RATE
    [error] = p.send("conversation.item.truncate", item_id=response["output"][0]["id"],
                     content_index=0, audio_end_ms=played_ms)
    assert error["error"]["message"] == (
        f"Audio content of 400ms is already shorter than {played_ms}ms.")
    [ok] = p.send("conversation.item.truncate", item_id=response["output"][0]["id"],
                  content_index=0, audio_end_ms=400)
    assert ok["type"] == "conversation.item.truncated"


def test_benign_errors_where_the_service_gives_them():
    p = Peer(reply_seconds=5.0, faults=Faults(benign_errors=True))
    p.append(turn_audio(0.6))
    p.stream(chunks=2)
    p.append(tone(0.3, freq=600))  # the server cancelled the reply itself (turn_detected) ...
    [error] = p.send("response.cancel")  # ... so the client's own cancel finds nothing
    assert error["error"]["code"] == "response_cancel_not_active"
    while "input_audio_buffer.speech_stopped" not in types(p.append(silence(0.02))):
        pass  # the turn ends: committed by the VAD, a new reply starts
    [error] = p.send("input_audio_buffer.commit")  # the client's commit: nothing left
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    [error] = p.send("response.create")  # the VAD's reply is active
    assert error["error"]["code"] == "conversation_already_has_active_response"


def test_without_benign_errors_the_silence_after_a_turn_stays_committable():
    p = Peer()
    p.append(np.concatenate([silence(0.5), tone(0.5)]))
    while "input_audio_buffer.speech_stopped" not in types(p.append(silence(0.02))):
        pass
    assert types(p.send("input_audio_buffer.commit"))[0] == "input_audio_buffer.committed"


def test_extra_fields_and_rate_limits_still_validate():
    p = Peer(faults=Faults(extra_fields=True, rate_limits=True,
                           transcript_delay="after_reply_start"))
    p.send("session.update", session=TRANSCRIBE)
    heard = p.append(turn_audio(1.0))
    assert all(e["obfuscation"] for e in heard if e["type"] == DELTA)
    first_reply = p.stream()
    assert types(first_reply)[-2:] == ["response.done", "rate_limits.updated"]
    usage = first_reply[-2]["response"]["usage"]
    limits = {lim["name"]: lim for lim in first_reply[-1]["rate_limits"]}
    assert limits["tokens"]["remaining"] == limits["tokens"]["limit"] - usage["total_tokens"]
    item = first_reply[-2]["response"]["output"][0]
    assert item["phase"] == "final_answer"
    assert all(e["obfuscation"] for e in first_reply
               if e["type"] == "response.output_audio_transcript.delta")
    details = usage["output_token_details"]
    assert details["reasoning_tokens"] > 0
    assert usage["output_tokens"] == (details["text_tokens"] + details["audio_tokens"]
                                      + details["reasoning_tokens"])
    assert usage["input_token_details"]["cached_tokens"] == 0  # nothing before it
    p.send("response.create")
    usage = p.stream()[-2]["response"]["usage"]
    cached = usage["input_token_details"]
    assert cached["cached_tokens"] > 0
    assert cached["cached_tokens"] == (cached["cached_tokens_details"]["audio_tokens"]
                                       + cached["cached_tokens_details"]["text_tokens"])


def test_audio_in_bursts():
    p = Peer(reply_seconds=3.0)
    p.send("response.create")
    reply, _ = p.queue[0]
    steps = list(reply.steps(synthesize(reply.seed, reply.seconds), (250, 430)))
    sizes = [len(base64.b64decode(e["delta"])) // 2 * 1000 // RATE for e in steps
             if isinstance(e, dict) and e["type"] == "response.output_audio.delta"]
    assert sum(sizes) >= 2990 and all(250 <= s <= 430 for s in sizes[:-1])
    assert len(set(sizes)) > 2  # not one fixed size


def test_session_minutes_shorten_expires_at():
    created = Peer(faults=Faults(session_minutes=2)).events[0]
    assert created["session"]["expires_at"] == int(NOW) + 120


# --------------------------------------------------------------------------- idle timeout


IDLE = {"type": "realtime", "audio": {"input": {"turn_detection": {
    "type": "server_vad", "idle_timeout_ms": 6000}}}}


def test_the_idle_nudge():
    p = Peer()
    assert p.session.idle_timeout_s is None  # not asked for
    p.send("session.update", session=IDLE)
    assert p.session.idle_timeout_s == 6.0
    p.append(silence(1.0))
    events = p.idle()
    assert types(events) == [
        "input_audio_buffer.timeout_triggered",
        "conversation.item.added", "conversation.item.done",  # the system note
        "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.done",  # the empty user item
    ]
    trigger = events[0]
    assert (trigger["audio_start_ms"], trigger["audio_end_ms"]) == (0, 1000)
    assert events[1]["item"]["role"] == "system"
    user = events[4]["item"]
    assert user["role"] == "user" and user["id"] == trigger["item_id"]
    assert user["content"] == [{"type": "input_audio", "transcript": None}]
    assert len(p.queue) == 1 and p.session.idle_timeout_s is None  # replying: disarmed
    epoch = p.session.idle_epoch
    p.stream()
    assert p.session.idle_timeout_s == 6.0 and p.session.idle_epoch != epoch  # starts over
    p.append(np.concatenate([silence(0.5), tone(0.5)]))
    assert p.session.idle_timeout_s is None  # someone is speaking


def test_no_idle_timeout_on_semantic_vad():
    p = Peer()
    p.send("session.update", session={"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "idle_timeout_ms": 6000}}}})
    assert p.session.idle_timeout_s is None


# --------------------------------------------------------------------------- --fault


def test_fault_options():
    faults = parse_faults(["connect-error=insufficient_quota", "junk", "rate_limits=false",
                           "fail_responses=2", "fail_responses=3:content_filter",
                           "audio_delta_ms=250-430", "transcript_delay=after_reply_start",
                           "session_minutes=0.5", "leftover_audio_deltas=2"])
    assert faults == Faults(connect_error="insufficient_quota", junk=True,
                            fail_responses=((2, "failed"), (3, "content_filter")),
                            audio_delta_ms=(250, 430), transcript_delay="after_reply_start",
                            session_minutes=0.5, leftover_audio_deltas=2)
    assert parse_faults(["transcript_delay=1.5"]).transcript_delay == 1.5
    for bad in ("teleport", "close_code", "junk=maybe", "fail_responses=2:boom",
                "session_minutes=-1", "audio_delta_ms=400-300", "connect_error=nope"):
        with pytest.raises(FaultError) as info:
            parse_faults([bad])
        assert str(info.value).startswith("--fault") and "\n" not in str(info.value)
        with pytest.raises(BackendOptionError):
            backend_config([bad])


# --------------------------------------------------------------------------- over the wire


@pytest.mark.parametrize(("kind", "code"), [
    ("invalid_api_key", 3000), ("insufficient_quota", 1013), ("model_not_found", 4000)])
async def test_connect_errors_come_after_the_upgrade(autojump_clock, kind, code):
    async with in_memory(BackendConfig(faults=Faults(connect_error=kind)),
                         model="gpt-nope") as (c, _):
        error = await c.recv()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await c.recv()
    assert error["type"] == "error" and error["error"]["code"] == kind
    if kind == "model_not_found":
        assert "gpt-nope" in error["error"]["message"]
    assert info.value.reason.code == code


async def test_a_wrong_key_is_refused_after_the_upgrade_and_the_right_one_served(autojump_clock):
    config = BackendConfig(api_key="sk-right", faults=Faults(connect_error="invalid_api_key"))
    async with in_memory(config, [(b"Authorization", b"Bearer sk-wrong")]) as (c, _):
        assert (await c.recv())["error"]["code"] == "invalid_api_key"
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await c.recv()
        assert info.value.reason.code == 3000
    async with in_memory(config, [(b"Authorization", b"Bearer sk-right")]) as (c, _):
        assert (await c.recv())["type"] == "session.created"


async def test_the_session_ends_at_its_maximum_duration(autojump_clock):
    start = trio.current_time()
    async with in_memory(BackendConfig(faults=Faults(session_minutes=60))) as (c, _):
        await c.recv()
        error = await c.recv()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await c.recv()
    assert error["error"]["code"] == "session_expired" and "60 minutes" in error["error"]["message"]
    assert c.time_of(error) - start == pytest.approx(3600)
    assert info.value.reason.code == 1001


async def test_server_pings(autojump_clock):
    async with in_memory(BackendConfig(faults=Faults(server_ping_s=20))) as (c, sniffer):
        await c.recv()
        await trio.sleep(65)
        await c.update(instructions="still here")  # the connection is alive and answers
    pings = [n for n in range(1, 6) if b"\x89\x08" + f"{n:08d}".encode() in sniffer.received]
    assert pings == [1, 2, 3]  # at 20, 40 and 60 s


async def test_a_transcript_some_seconds_late(autojump_clock):
    config = BackendConfig(realtime_factor=1.0, faults=Faults(transcript_delay=4.0))
    async with in_memory(config) as (c, _):
        await c.recv()
        await c.update(audio=TRANSCRIBE["audio"])
        await c.stream(turn_audio(1.0))
        committed = (await c.until("input_audio_buffer.committed"))[-1]
        done = await c.until(COMPLETED)
    assert "response.created" in types(done)  # the reply started meanwhile
    assert c.time_of(done[-1]) - c.time_of(committed) == pytest.approx(4.0)


async def test_the_idle_timeout_over_the_wire(autojump_clock):
    config = BackendConfig(realtime_factor=1.0, reply_seconds=1.0)
    async with in_memory(config) as (c, _):
        await c.recv()
        await c.update(**{k: v for k, v in IDLE.items() if k != "type"})
        updated = c.times[-1]
        trigger = (await c.until("input_audio_buffer.timeout_triggered"))[-1]
        assert c.time_of(trigger) - updated == pytest.approx(6.0)
        done = (await c.until("response.done"))[-1]
        again = (await c.until("input_audio_buffer.timeout_triggered"))[-1]
        assert c.time_of(again) - c.time_of(done) == pytest.approx(6.0)  # restarted
        await c.until("response.done")
        # A turn of speech: its reply, then 6 s of quiet before the next nudge.
        await c.stream(turn_audio(0.5))
        events = await c.until("response.done")
        third = (await c.until("input_audio_buffer.timeout_triggered"))[-1]
    assert "input_audio_buffer.speech_stopped" in types(events)
    assert "input_audio_buffer.timeout_triggered" not in types(events)
    assert c.time_of(third) - c.time_of(events[-1]) == pytest.approx(6.0)


async def test_leftover_audio_over_the_wire(autojump_clock):
    config = BackendConfig(realtime_factor=1.0,
                           faults=Faults(reply_seconds=5.0, leftover_audio_deltas=2))
    async with in_memory(config) as (c, _):
        await c.recv()
        await c.stream(turn_audio(0.6))
        await c.until("response.output_audio.delta")
        await c.until("response.output_audio.delta")
        await c.stream(tone(0.3, freq=600))
        events = await c.until("response.done")
    order = types(events)
    started = order.index("input_audio_buffer.speech_started")
    after = order[started + 1 : order.index("response.output_audio.done")]
    assert after.count("response.output_audio.delta") == 2
    assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"


def test_the_faults_docstring_names_every_switch():
    doc = Faults.__doc__ or ""
    assert [f.name for f in dataclasses.fields(Faults)
            if f"``{f.name}" not in doc and f.name != "close_code"] == []
    assert json.dumps(Faults().__dict__)  # plain data
