"""The local backend against real websocket clients; every event checked against the SDK schema."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import trio
import trio_websocket
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter, ValidationError

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.localbackend.server import BackendConfig, Faults, serve_local

RATE = 24000
FRAME = 480  # 20 ms
FAST = 50.0  # realtime_factor for tests: a 1 s reply streams in 20 ms
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)


# --------------------------------------------------------------------------- helpers


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.int16)


def tone(seconds: float, dbfs: float = -20.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    amp = 32768 * 10 ** (dbfs / 20) * np.sqrt(2)
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def turn_audio(speech_s: float = 1.0, freq: float = 440.0) -> np.ndarray:
    """0.5 s silence, a tone burst, 1 s silence: one server-VAD turn."""
    return np.concatenate([silence(0.5), tone(speech_s, freq=freq), silence(1.0)])


def espeak_pcm(text: str, tmp_path: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("espeak-ng is required on CI")
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    data, rate = sf.read(wav, dtype="float32")
    return np.round(soxr.resample(data, rate, RATE) * 32767).astype(np.int16)


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")


def pcm_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


class Client:
    """A raw websocket client; every JSON event received is validated against the SDK schema."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._n = 0

    async def send(self, type_: str, **body: Any) -> str:
        self._n += 1
        event_id = f"evt_test_{self._n}"
        await self.ws.send_message(json.dumps({"type": type_, "event_id": event_id, **body}))
        return event_id

    async def recv(self) -> dict[str, Any]:
        message = await self.ws.get_message()
        event = json.loads(message)
        SERVER_EVENT.validate_python(event)
        self.events.append(event)
        return event

    async def until(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        """Events up to and including the first ``type_`` whose fields equal ``match``."""
        got = []
        while True:
            event = await self.recv()
            got.append(event)
            if event["type"] == type_ and all(event.get(k) == v for k, v in match.items()):
                return got

    async def stream(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), FRAME):
            await self.send("input_audio_buffer.append", audio=b64(pcm[i : i + FRAME]))

    async def update(self, **session: Any) -> dict[str, Any]:
        await self.send("session.update", session={"type": "realtime", **session})
        return (await self.until("session.updated"))[-1]["session"]


@asynccontextmanager
async def backend(**config: Any) -> AsyncIterator[int]:
    config.setdefault("realtime_factor", FAST)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_local, "127.0.0.1", 0, BackendConfig(**config))
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    port: int, headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[Client]:
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime-2.1"
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        client = Client(ws)
        created = await client.recv()
        assert created["type"] == "session.created"
        yield client


TRANSCRIBE = {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}


# --------------------------------------------------------------------------- schema check


def test_schema_validation_really_rejects_mangled_events():
    good = {"type": "input_audio_buffer.speech_started", "event_id": "event_1",
            "audio_start_ms": 200, "item_id": "item_1"}
    SERVER_EVENT.validate_python(good)
    for bad in (
        {k: v for k, v in good.items() if k != "audio_start_ms"},
        {**good, "audio_start_ms": "soon"},
        {**good, "type": "input_audio_buffer.speech_begun"},
        {"type": "response.done", "event_id": "e", "response": {"status": "finished"}},
        {"type": "conversation.item.added", "event_id": "e",
         "item": {"type": "message", "role": "robot", "content": []}},
    ):
        with pytest.raises(ValidationError):
            SERVER_EVENT.validate_python(bad)


# --------------------------------------------------------------------------- a whole turn


@pytest.mark.parametrize("source", ["tone", "espeak"])
async def test_whole_turn(source, tmp_path):
    if source == "tone":
        speech = tone(1.0)
    else:
        speech = espeak_pcm("Hello R2, what is the weather like on Tatooine today?", tmp_path)
    pcm = np.concatenate([silence(0.5), speech, silence(1.0)])
    with trio.fail_after(10):
        async with backend(reply_seconds=1.5) as port, connect(port) as c:
            created = c.events[0]["session"]
            assert created["model"] == "gpt-realtime-2.1"
            assert created["id"].startswith("sess_")
            assert created["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            session = await c.update(
                instructions="Be R2.",
                audio={**TRANSCRIBE, "output": {"voice": "cedar"}},
            )
            assert session["instructions"] == "Be R2."
            assert session["audio"]["output"]["voice"] == "cedar"
            assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
            await c.stream(pcm)
            events = await c.until("response.done")

    order = types(events)
    milestones = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    positions = [order.index(m) for m in milestones]
    assert positions == sorted(positions)
    assert order.count("input_audio_buffer.speech_started") == 1
    by_type = {e["type"]: e for e in events}  # last of each type
    started = by_type["input_audio_buffer.speech_started"]
    stopped = by_type["input_audio_buffer.speech_stopped"]
    user_item = started["item_id"]
    assert user_item.startswith("item_")
    assert stopped["item_id"] == by_type["input_audio_buffer.committed"]["item_id"] == user_item
    transcription = by_type["conversation.item.input_audio_transcription.completed"]
    assert transcription["item_id"] == user_item
    if source == "tone":
        assert started["audio_start_ms"] == 200  # onset 500 ms - 300 ms padding
        assert stopped["audio_end_ms"] == 1500
        assert transcription["transcript"] == "(speech, 1.0 s)"
    else:
        voiced = np.flatnonzero(np.abs(speech) > 300)
        seconds = (voiced[-1] - voiced[0]) / RATE
        said = float(transcription["transcript"].removeprefix("(speech, ").removesuffix(" s)"))
        assert said == pytest.approx(seconds, abs=0.25)

    # The user item, then the assistant item after it.
    added = [e for e in events if e["type"] == "conversation.item.added"]
    assert added[0]["item"]["role"] == "user" and added[0]["item"]["id"] == user_item
    assert added[0]["item"]["content"][0]["type"] == "input_audio"
    assistant = by_type["response.output_item.added"]["item"]
    assert assistant["role"] == "assistant" and assistant["id"].startswith("item_")
    assert added[1]["item"]["id"] == assistant["id"]
    assert added[1]["previous_item_id"] == user_item

    # Audio: exactly reply_seconds of PCM16; transcript deltas add up to the final transcript.
    audio = np.frombuffer(pcm_of(events), "<i2")
    assert len(audio) == round(1.5 * RATE)
    assert 20 * np.log10(np.abs(audio).max() / 32768) == pytest.approx(-12, abs=0.1)
    deltas = "".join(
        e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"
    )
    final = by_type["response.output_audio_transcript.done"]["transcript"]
    assert deltas == final and "R2 answers in beeps" in final
    response = by_type["response.done"]["response"]
    response_id = by_type["response.created"]["response"]["id"]
    assert response_id.startswith("resp_") and response["id"] == response_id
    assert all(
        e["response_id"] == response_id
        for e in events
        if e["type"].startswith("response.") and "response_id" in e
    )
    assert response["status"] == "completed"
    assert response["output"][0]["content"][0]["transcript"] == final
    assert response["audio"]["output"]["voice"] == "cedar"

    usage = response["usage"]
    user_audio_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
    assert usage["input_token_details"]["audio_tokens"] == user_audio_ms * 10 // 1000
    assert usage["input_token_details"]["text_tokens"] == len("Be R2.") // 4
    assert usage["input_token_details"]["cached_tokens"] == 0
    assert usage["output_token_details"] == {"audio_tokens": 30, "text_tokens": len(final) // 4}
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"]

    ids = [e["event_id"] for e in c.events]
    assert len(set(ids)) == len(ids) and all(i.startswith("event_") for i in ids)


async def test_one_big_append_is_accepted():
    """A 10 s append (1.3 MB of base64) fits the 16 MiB message limit."""
    pcm = np.concatenate([turn_audio(1.0), silence(7.5)])
    with trio.fail_after(10):
        async with backend() as port, connect(port) as c:
            await c.send("input_audio_buffer.append", audio=b64(pcm))
            events = await c.until("response.done")
    assert "input_audio_buffer.speech_stopped" in types(events)


async def test_same_input_same_reply_and_different_input_different_reply():
    async def reply_for(pcm: np.ndarray) -> tuple[bytes, str]:
        async with backend() as port, connect(port) as c:
            await c.stream(pcm)
            events = await c.until("response.done")
        done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
        return pcm_of(events), done["transcript"]

    with trio.fail_after(10):
        first = await reply_for(turn_audio(1.0, 440))
        again = await reply_for(turn_audio(1.0, 440))
        other = await reply_for(turn_audio(1.2, 660))
    assert first == again
    assert first[0] != other[0]


def test_beeps_are_deterministic_and_at_a_comfortable_level():
    audio, text = r2_reply(b"turn", 2.0)
    again, text_again = r2_reply(b"turn", 2.0)
    assert np.array_equal(audio, again) and text == text_again
    assert audio.dtype == np.int16 and len(audio) == 2 * RATE
    assert 20 * np.log10(np.abs(audio).max() / 32768) == pytest.approx(-12, abs=0.1)
    assert text.startswith("*") and "no speech understanding" in text
    assert not np.array_equal(audio, r2_reply(b"other turn", 2.0)[0])
    assert len(r2_reply(3, 0.5, rate=16000)[0]) == 8000


# --------------------------------------------------------------------------- interruption


async def test_speech_during_a_reply_cancels_it():
    with trio.fail_after(10):
        faults = Faults(reply_seconds=6.0)
        async with backend(realtime_factor=10.0, faults=faults) as port, connect(port) as c:
            await c.stream(turn_audio(0.6))
            await c.until("response.output_audio.delta")
            await c.stream(tone(0.3, freq=600))
            events = await c.until("response.done")
            # The user's new turn is then answered in full.
            await c.stream(silence(0.7))
            second = await c.until("response.done")

    order = types(events)
    assert order.index("input_audio_buffer.speech_started") < order.index("response.done")
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert item["status"] == "incomplete"
    sent = [e for e in c.events if e["type"] == "response.output_audio.delta"
            and e["response_id"] == response["id"]]
    sent_pcm = pcm_of(sent)
    assert 0 < len(sent_pcm) < 6 * RATE * 2
    assert response["usage"]["output_token_details"]["audio_tokens"] == (
        len(sent_pcm) // 2 * 20 // RATE
    )
    partial = "".join(e["delta"] for e in c.events
                      if e["type"] == "response.output_audio_transcript.delta"
                      and e["response_id"] == response["id"])
    done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert done["transcript"] == partial
    assert second[-1]["response"]["status"] == "completed"
    assert len(pcm_of(second)) == 6 * RATE * 2


async def test_no_interruption_when_interrupt_response_is_off():
    with trio.fail_after(10):
        faults = Faults(reply_seconds=3.0)
        async with backend(realtime_factor=10.0, faults=faults) as port, connect(port) as c:
            await c.update(audio={"input": {"turn_detection": {
                "type": "server_vad", "interrupt_response": False}}})
            await c.stream(turn_audio(0.6))
            await c.until("response.output_audio.delta")
            await c.stream(tone(0.3, freq=600))
            events = await c.until("response.done")
    assert "input_audio_buffer.speech_started" in types(events)
    assert events[-1]["response"]["status"] == "completed"
    assert len(pcm_of(events)) > 0


# --------------------------------------------------------------------------- control events


async def test_truncate_delete_create_answers():
    with trio.fail_after(10):
        async with backend() as port, connect(port) as c:
            await c.send("response.create", response={"metadata": {"why": "test"}})
            events = await c.until("response.done")
            response = events[-1]["response"]
            assert response["status"] == "completed" and response["metadata"] == {"why": "test"}
            assistant = response["output"][0]["id"]
            await c.send("conversation.item.retrieve", item_id=assistant)
            retrieved = await c.recv()
            assert retrieved["type"] == "conversation.item.retrieved"
            assert retrieved["item"]["content"][0]["type"] == "output_audio"

            await c.send("conversation.item.truncate", item_id=assistant, content_index=0,
                         audio_end_ms=400)
            truncated = await c.recv()
            assert truncated == {**truncated, "type": "conversation.item.truncated",
                                 "item_id": assistant, "content_index": 0, "audio_end_ms": 400}
            # Beyond the (now 400 ms) audio, or an unknown item: errors naming the event.
            bad = await c.send("conversation.item.truncate", item_id=assistant, content_index=0,
                               audio_end_ms=900)
            error = await c.recv()
            assert error["type"] == "error" and error["error"]["event_id"] == bad
            assert error["error"]["param"] == "audio_end_ms"
            bad = await c.send("conversation.item.truncate", item_id="item_nope",
                               content_index=0, audio_end_ms=0)
            error = await c.recv()
            assert error["type"] == "error" and error["error"]["event_id"] == bad
            assert error["error"]["code"] == "item_truncate_invalid_item_id"

            await c.send("conversation.item.create", item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "What is the time?"}]})
            added, done = await c.recv(), await c.recv()
            assert added["type"] == "conversation.item.added"
            assert done["type"] == "conversation.item.done"
            user = added["item"]
            assert user["role"] == "user" and user["id"].startswith("item_")
            assert user["content"] == [{"type": "input_text", "text": "What is the time?"}]
            assert added["previous_item_id"] == assistant

            await c.send("conversation.item.create", previous_item_id="root", item={
                "id": "item_sys", "type": "message", "role": "system",
                "content": [{"type": "input_text", "text": "Context from a previous session."}]})
            added = (await c.until("conversation.item.done"))[0]
            assert added["item"]["id"] == "item_sys" and added["previous_item_id"] is None
            await c.send("conversation.item.create", item={
                "type": "message", "role": "robot", "content": [{"type": "input_text"}]})
            assert (await c.recv())["type"] == "error"

            # The text items now count in the next response's input.
            await c.send("response.create")
            usage = (await c.until("response.done"))[-1]["response"]["usage"]
            expected_text = (len("You are R2-D2. You answer in beeps and whistles.") // 4
                             + len("What is the time?") // 4
                             + len("Context from a previous session.") // 4)
            assert usage["input_token_details"]["text_tokens"] == expected_text

            await c.send("conversation.item.delete", item_id=user["id"])
            deleted = await c.recv()
            assert deleted["type"] == "conversation.item.deleted"
            assert deleted["item_id"] == user["id"]
            await c.send("conversation.item.delete", item_id=user["id"])
            error = await c.recv()
            assert error["error"]["code"] == "item_delete_invalid_item_id"


async def test_response_cancel_and_one_response_at_a_time():
    with trio.fail_after(10):
        faults = Faults(reply_seconds=5.0)
        async with backend(realtime_factor=2.0, faults=faults) as port, connect(port) as c:
            bad = await c.send("response.cancel")
            error = await c.recv()
            assert error["type"] == "error" and error["error"]["event_id"] == bad
            assert error["error"]["code"] == "response_cancel_not_active"

            await c.send("response.create")
            await c.until("response.output_audio.delta")
            await c.send("response.create")
            errors = await c.until("error")
            assert errors[-1]["error"]["code"] == "conversation_already_has_active_response"
            await c.send("response.cancel")
            events = await c.until("response.done")
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"]["reason"] == "client_cancelled"
    assert len(pcm_of(c.events)) < 5 * RATE * 2


async def test_manual_turns_commit_and_clear():
    with trio.fail_after(10):
        async with backend() as port, connect(port) as c:
            session = await c.update(audio={"input": {
                "turn_detection": None, "transcription": {"model": "whisper-1"}}})
            assert session["audio"]["input"]["turn_detection"] is None
            bad = await c.send("input_audio_buffer.commit")
            error = await c.recv()
            assert error["error"]["code"] == "input_audio_buffer_commit_empty"
            assert error["error"]["event_id"] == bad

            await c.stream(turn_audio(1.0))  # no VAD: no speech events, no reply
            await c.send("input_audio_buffer.commit")
            events = await c.until("conversation.item.input_audio_transcription.completed")
            assert types(events) == [
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done",
                "conversation.item.input_audio_transcription.completed",
            ]
            assert events[-1]["transcript"] == "(speech, 2.5 s)"  # the whole buffer

            await c.stream(tone(0.5))
            await c.send("input_audio_buffer.clear")
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"
            await c.send("input_audio_buffer.commit")
            assert (await c.recv())["error"]["code"] == "input_audio_buffer_commit_empty"

            await c.send("response.create")
            done = (await c.until("response.done"))[-1]
            assert done["response"]["status"] == "completed"


async def test_bad_client_messages_get_errors_and_the_session_goes_on():
    with trio.fail_after(10):
        async with backend() as port, connect(port) as c:
            await c.ws.send_message("{not json")
            error = await c.recv()
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"

            await c.ws.send_message(b"\x00\x01")
            assert (await c.recv())["type"] == "error"

            bad = await c.send("conversation.item.teleport")
            error = await c.recv()
            assert error["error"]["event_id"] == bad and error["error"]["param"] == "type"

            bad = await c.send("input_audio_buffer.append", audio="@@not base64@@")
            assert (await c.recv())["error"]["event_id"] == bad

            bad = await c.send("session.update", session={"instructions": "no type"})
            error = await c.recv()
            assert error["error"]["param"] == "session.type"

            bad = await c.send("session.update", session={
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 7}}}})
            error = await c.recv()
            assert error["error"]["event_id"] == bad
            assert "threshold" in error["error"]["param"]

            session = await c.update(audio={"input": {"turn_detection": {
                "type": "server_vad", "silence_duration_ms": 200}}})
            assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 200
            assert session["audio"]["input"]["turn_detection"]["threshold"] == 0.5
            await c.stream(turn_audio(0.5))
            events = await c.until("response.done")
            stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
            assert stopped["audio_end_ms"] == 1000


# --------------------------------------------------------------------------- auth


async def test_api_key_is_checked_at_the_handshake(caplog):
    caplog.set_level(logging.DEBUG)
    assert "sk-local-secret" not in repr(BackendConfig(api_key="sk-local-secret"))
    with trio.fail_after(10):
        async with backend(api_key="sk-local-secret") as port:
            for headers in (None, [("Authorization", "Bearer sk-wrong")]):
                with pytest.raises(trio_websocket.ConnectionRejected) as info:
                    async with connect(port, headers):
                        pass
                assert info.value.status_code == 401
                body = json.loads(info.value.body)
                assert body["error"]["type"] == "invalid_request_error"
                assert b"sk-local-secret" not in info.value.body
            assert body["error"]["code"] == "invalid_api_key"
            async with connect(port, [("Authorization", "Bearer sk-local-secret")]) as c:
                await c.send("response.create")
                assert (await c.until("response.done"))[-1]["response"]["status"] == "completed"
    assert "sk-local-secret" not in caplog.text
    assert "401" in caplog.text or "rejected" in caplog.text


# --------------------------------------------------------------------------- faults


async def test_fault_abort_drops_the_connection_after_the_nth_response():
    with trio.fail_after(10):
        async with backend(faults=Faults(abort_after_responses=2)) as port, connect(port) as c:
            for _ in range(2):
                await c.send("response.create")
                await c.until("response.done")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1006  # no close frame: abnormal closure


async def test_fault_close_with_code():
    with trio.fail_after(10):
        faults = Faults(close_after_responses=1, close_code=1011)
        async with backend(faults=faults) as port, connect(port) as c:
            await c.send("response.create")
            await c.until("response.done")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1011


async def test_fault_session_expired():
    with trio.fail_after(10):
        async with backend(faults=Faults(expire_after_responses=1)) as port, connect(port) as c:
            await c.send("response.create")
            await c.until("response.done")
            error = await c.recv()
            assert error["type"] == "error" and error["error"]["code"] == "session_expired"
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1000


async def test_fault_junk_arrives_before_each_reply():
    with trio.fail_after(10):
        async with backend(faults=Faults(junk=True)) as port, connect(port) as c:
            for _ in range(2):
                await c.send("response.create")
                raw = [await c.ws.get_message() for _ in range(4)]
                assert json.loads(raw[0])["type"] not in ("error", "response.created")
                with pytest.raises(json.JSONDecodeError):
                    json.loads(raw[1])
                assert isinstance(raw[2], bytes)
                error = json.loads(raw[3])
                SERVER_EVENT.validate_python(error)
                assert error["type"] == "error"
                events = await c.until("response.done")
                assert events[0]["type"] == "response.created"
                assert events[-1]["response"]["status"] == "completed"


async def test_fault_reply_delay_and_length():
    with trio.fail_after(10):
        faults = Faults(reply_delay_s=0.3, reply_seconds=2.5)
        async with backend(reply_seconds=1.0, faults=faults) as port, connect(port) as c:
            start = trio.current_time()
            await c.send("response.create")
            await c.until("response.created")
            assert trio.current_time() - start >= 0.3
            events = await c.until("response.done")
    assert len(pcm_of(events)) == round(2.5 * RATE) * 2


async def test_cancel_during_the_reply_delay_still_answers_created_and_done():
    with trio.fail_after(10):
        async with backend(faults=Faults(reply_delay_s=5.0)) as port, connect(port) as c:
            await c.send("response.create")
            await c.send("response.cancel")
            events = await c.until("response.done")
    assert types(events) == ["response.created", "response.done"]
    response = events[-1]["response"]
    assert response["status"] == "cancelled" and response["output"] == []
    assert response["id"] == events[0]["response"]["id"]


async def test_cancelling_the_server_closes_its_connections():
    with trio.fail_after(10):
        server_scope = trio.CancelScope()
        config = BackendConfig(realtime_factor=FAST)

        async def run_server(task_status=trio.TASK_STATUS_IGNORED):
            with server_scope:
                await serve_local("127.0.0.1", 0, config, task_status=task_status)

        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_server)
            async with connect(port) as c:
                server_scope.cancel()
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await c.recv()
    assert info.value.reason.code == 1001
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# --------------------------------------------------------------------------- the openai SDK


def sdk_turn(port: int, audio_b64: str) -> list[Any]:
    """One turn through the openai SDK's own realtime client (asyncio, in a worker thread)."""
    from openai import AsyncOpenAI

    async def main() -> list[Any]:
        client = AsyncOpenAI(api_key="sk-sdk", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        seen: list[Any] = []
        async with client.realtime.connect(model="gpt-realtime-2.1") as conn:
            await conn.session.update(session={
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            })
            await conn.input_audio_buffer.append(audio=audio_b64)
            async for event in conn:
                seen.append(event)
                if event.type == "response.done":
                    break
        return seen

    return asyncio.run(asyncio.wait_for(main(), 10))


async def test_the_openai_sdk_client_holds_a_turn():
    with trio.fail_after(15):
        async with backend(api_key="sk-sdk") as port:
            events = await trio.to_thread.run_sync(sdk_turn, port, b64(turn_audio(1.0)))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.created"
    assert events[0].session.model == "gpt-realtime-2.1"
    for expected in ("session.updated", "input_audio_buffer.speech_started",
                     "conversation.item.input_audio_transcription.completed",
                     "response.output_audio.delta", "response.done"):
        assert expected in kinds
    assert events[-1].response.status == "completed"
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.output_audio.delta")
    assert len(audio) == RATE * 2
