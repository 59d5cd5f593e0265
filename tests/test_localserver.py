"""The local backend's trio shell: real websocket clients (ours and the openai SDK's), faults,
auth, shutdown, and the reply pacing on trio's MockClock. Every JSON event a client receives
is checked against the SDK's schema. The protocol itself is tested in test_localsession.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import socket
import sys
from typing import Any

import numpy as np
import pytest
import trio
import trio_websocket
from localpeer import SERVER_EVENT, b64, pcm_of, turn_audio, types
from localwire import FAST, backend, connect
from pydantic import ValidationError
from support import RATE, clean_env, silence, tone

from r2d2voice.localbackend.command import ListenError, serve_local_command
from r2d2voice.localbackend.reply import Reply
from r2d2voice.localbackend.server import BackendConfig, Faults, serve_local, stream_reply
from r2d2voice.localbackend.session import CancelReply, LocalSession
from r2d2voice.localbackend.wire import CountingIds

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


# --------------------------------------------------------------------------- over the wire


async def test_a_whole_turn_over_a_websocket():
    with trio.fail_after(10):
        async with backend(reply_seconds=1.5) as url, connect(url) as c:
            created = c.events[0]["session"]
            assert created["model"] == "local" and created["id"].startswith("sess_")
            session = await c.update(instructions="Be R2.",
                                     audio={"input": {"transcription": {"model": "whisper-1"}}})
            assert session["instructions"] == "Be R2."
            await c.stream(turn_audio(1.0))
            events = await c.until("response.done")

    order = types(events)
    milestones = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.done",
    ]
    positions = [order.index(m) for m in milestones]
    assert positions == sorted(positions)
    assert events[-1]["response"]["status"] == "completed"
    assert len(pcm_of(events)) == round(1.5 * RATE) * 2
    ids = [e["event_id"] for e in c.events]
    assert len(set(ids)) == len(ids) and all(i.startswith("event_") for i in ids)
    assert events[0]["item_id"].startswith("item_")


async def test_one_big_append_is_accepted():
    """A 10 s append (1.3 MB of base64) fits the 16 MiB message limit."""
    pcm = np.concatenate([turn_audio(1.0), silence(7.5)])
    with trio.fail_after(10):
        async with backend() as url, connect(url) as c:
            await c.send("input_audio_buffer.append", audio=b64(pcm))
            events = await c.until("response.done")
    assert "input_audio_buffer.speech_stopped" in types(events)


async def test_speech_during_a_reply_cancels_its_streaming():
    with trio.fail_after(10):
        faults = Faults(reply_seconds=8.0)
        async with backend(realtime_factor=10.0, faults=faults) as url, connect(url) as c:
            await c.stream(turn_audio(0.6))
            await c.until("response.output_audio.delta")
            await c.stream(tone(0.3, freq=600))
            events = await c.until("response.done")
    assert types(events).index("input_audio_buffer.speech_started") < len(events) - 1
    response = events[-1]["response"]
    assert response["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    sent = pcm_of([e for e in c.events if e.get("response_id") == response["id"]])
    assert 0 < len(sent) < 8 * RATE * 2
    assert response["usage"]["output_token_details"]["audio_tokens"] == len(sent) // 2 * 20 // RATE


async def test_bad_frames_get_errors_and_the_session_goes_on():
    with trio.fail_after(10):
        async with backend() as url, connect(url) as c:
            await c.ws.send_message("{not json")
            assert (await c.recv())["error"]["code"] == "invalid_json"
            await c.ws.send_message(b"\x00\x01")
            assert (await c.recv())["error"]["code"] == "invalid_json"
            bad = await c.send("conversation.item.teleport")
            assert (await c.recv())["error"]["event_id"] == bad
            await c.send("response.create")
            assert (await c.until("response.done"))[-1]["response"]["status"] == "completed"


# --------------------------------------------------------------------------- auth


async def test_api_key_is_checked_at_the_handshake(caplog):
    caplog.set_level(logging.DEBUG)
    assert "sk-local-secret" not in repr(BackendConfig(api_key="sk-local-secret"))
    with trio.fail_after(10):
        async with backend(api_key="sk-local-secret") as url:
            for headers in (None, [("Authorization", "Bearer sk-wrong")]):
                with pytest.raises(trio_websocket.ConnectionRejected) as info:
                    async with connect(url, headers):
                        pass
                assert info.value.status_code == 401
                body = json.loads(info.value.body)
                assert body["error"]["type"] == "invalid_request_error"
                assert b"sk-local-secret" not in info.value.body
            assert body["error"]["code"] == "invalid_api_key"
            async with connect(url, [("Authorization", "Bearer sk-local-secret")]) as c:
                await c.send("response.create")
                assert (await c.until("response.done"))[-1]["response"]["status"] == "completed"
    assert "sk-local-secret" not in caplog.text
    assert "rejected" in caplog.text


# --------------------------------------------------------------------------- faults


async def test_fault_abort_drops_the_connection_after_the_nth_response():
    with trio.fail_after(10):
        async with backend(faults=Faults(abort_after_responses=2)) as url, connect(url) as c:
            for _ in range(2):
                await c.send("response.create")
                await c.until("response.done")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1006  # no close frame: abnormal closure


async def test_fault_close_with_code():
    with trio.fail_after(10):
        faults = Faults(close_after_responses=1, close_code=1011)
        async with backend(faults=faults) as url, connect(url) as c:
            await c.send("response.create")
            await c.until("response.done")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1011


async def test_fault_session_expired():
    with trio.fail_after(10):
        async with backend(faults=Faults(expire_after_responses=1)) as url, connect(url) as c:
            await c.send("response.create")
            await c.until("response.done")
            error = await c.recv()
            assert error["type"] == "error" and error["error"]["code"] == "session_expired"
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await c.recv()
    assert info.value.reason.code == 1000


async def test_fault_junk_arrives_before_each_reply():
    with trio.fail_after(10):
        async with backend(faults=Faults(junk=True)) as url, connect(url) as c:
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


async def test_fault_reply_length_overrides_the_config():
    with trio.fail_after(10):
        faults = Faults(reply_delay_s=0.01, reply_seconds=2.5)
        async with backend(reply_seconds=1.0, faults=faults) as url, connect(url) as c:
            await c.send("response.create")
            events = await c.until("response.done")
    assert events[0]["type"] == "response.created"
    assert len(pcm_of(events)) == round(2.5 * RATE) * 2


async def test_cancel_during_the_reply_delay_still_answers_created_and_done():
    with trio.fail_after(10):
        async with backend(faults=Faults(reply_delay_s=5.0)) as url, connect(url) as c:
            await c.send("response.create")
            await c.send("response.cancel")
            events = await c.until("response.done")
    assert types(events) == ["response.created", "response.done"]
    response = events[-1]["response"]
    assert response["status"] == "cancelled" and response["output"] == []
    assert response["id"] == events[0]["response"]["id"]


# --------------------------------------------------------------------------- pacing (MockClock)


async def timeline(config: BackendConfig, *client: str, cancel_after: int | None = None
                   ) -> list[tuple[float, dict[str, Any]]]:
    """Stream the reply ``client`` events start, on the test's clock: (time, event) pairs.
    After ``cancel_after`` audio deltas a ``response.cancel`` arrives."""
    session = LocalSession(clock=lambda: 0.0, new_id=CountingIds(),
                           reply_seconds=config.effective_reply_seconds)
    [reply] = [a for m in client for a in session.receive(json.dumps({"type": m}))]
    assert isinstance(reply, Reply)
    scope = trio.CancelScope()
    got: list[tuple[float, dict[str, Any]]] = []
    send, recv = trio.open_memory_channel[Any](0)  # unbuffered: a send is a delivery
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def replier() -> None:
            async with send:
                await stream_reply(session, reply, send, config, scope)

        nursery.start_soon(replier)
        async with recv:
            async for event in recv:
                got.append((trio.current_time() - start, event))
                deltas = sum(e["type"] == "response.output_audio.delta" for _, e in got)
                if event["type"] == "response.output_audio.delta" and deltas == cancel_after:
                    [action] = session.receive(json.dumps({"type": "response.cancel"}))
                    assert action == CancelReply(reply)
                    scope.cancel()
    return got


async def test_replies_are_paced_on_trio_clock_after_the_delay(autojump_clock):
    config = BackendConfig(reply_seconds=1.0, chunk_ms=100, realtime_factor=2.0,
                           faults=Faults(reply_delay_s=0.3))
    got = await timeline(config, "response.create")
    assert got[0] == (pytest.approx(0.3), got[0][1])
    assert got[0][1]["type"] == "response.created"
    deltas = [t for t, e in got if e["type"] == "response.output_audio.delta"]
    assert deltas == pytest.approx([0.3 + 0.05 * j for j in range(10)])  # 100 ms at 2x
    assert got[-1] == (pytest.approx(0.75), got[-1][1])
    assert got[-1][1]["response"]["status"] == "completed"


async def test_a_cancelled_reply_stops_at_once_and_closes(autojump_clock):
    config = BackendConfig(reply_seconds=10.0, realtime_factor=1.0)
    got = await timeline(config, "response.create", cancel_after=3)
    assert [e["type"] for _, e in got].count("response.output_audio.delta") == 3
    assert got[-1][0] == pytest.approx(0.2)  # the third chunk's time: nothing waits after it
    done = got[-1][1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"


# --------------------------------------------------------------------------- lifecycle


async def test_cancelling_the_server_closes_its_connections():
    with trio.fail_after(10):
        server_scope = trio.CancelScope()
        config = BackendConfig(realtime_factor=FAST)

        async def run_server(task_status=trio.TASK_STATUS_IGNORED):
            with server_scope:
                await serve_local("127.0.0.1", 0, config, task_status=task_status)

        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_server)
            async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as c:
                server_scope.cancel()
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await c.recv()
    assert info.value.reason.code == 1001
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


@pytest.fixture
def taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


async def test_a_port_in_use_is_one_plain_error(taken_port):
    with pytest.raises(OSError):  # an OSError, not an exception group
        await serve_local("127.0.0.1", taken_port, BackendConfig())


def test_serve_local_command_says_why_it_cannot_listen(taken_port):
    with pytest.raises(ListenError) as info:
        serve_local_command("127.0.0.1", taken_port)
    assert str(info.value).startswith(f"cannot listen on 127.0.0.1:{taken_port}: ")
    assert "\n" not in str(info.value)


async def test_serve_local_command_answers_until_sigterm(tmp_path):
    """What ``serve-local --fault ... --script FILE`` runs: the options reach the backend."""
    script = tmp_path / "turns.json"
    script.write_text('[{"say": "from the script"}]')
    code = ("from r2d2voice.localbackend.command import backend_config, serve_local_command; "
            "serve_local_command('127.0.0.1', 0, backend_config("
            f"['rate_limits', 'reply_seconds=0.1'], {str(script)!r}))")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(lambda task_status: trio.run_process(
                [sys.executable, "-c", code], env=clean_env(), stdout=-1, check=False,
                task_status=task_status))
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
            url = line.decode().split(" on ", 1)[1].strip()
            assert url.startswith("ws://127.0.0.1:") and url.endswith("/v1/realtime")
            async with connect(url) as c:  # replies stream in real time here: a short one
                assert (await c.update(instructions="Hi."))["instructions"] == "Hi."
                await c.send("response.create")
                events = await c.until("response.done")
                assert (await c.recv())["type"] == "rate_limits.updated"
            proc.send_signal(signal.SIGTERM)
    assert proc.returncode == 0
    done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert done["transcript"] == "from the script"
    assert len(pcm_of(events)) == round(0.1 * RATE) * 2


# --------------------------------------------------------------------------- the openai SDK


def sdk_turn(url: str, audio_b64: str) -> list[Any]:
    """One turn through the openai SDK's own realtime client (asyncio, in a worker thread)."""
    from openai import AsyncOpenAI

    async def main() -> list[Any]:
        base = url.removesuffix("/realtime")
        client = AsyncOpenAI(api_key="sk-sdk", websocket_base_url=base)
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
        async with backend(api_key="sk-sdk") as url:
            events = await trio.to_thread.run_sync(sdk_turn, url, b64(turn_audio(1.0)))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.created"
    assert events[0].session.model == "local"  # the SDK accepts a model it does not list
    for expected in ("session.updated", "input_audio_buffer.speech_started",
                     "conversation.item.input_audio_transcription.completed",
                     "response.output_audio.delta", "response.done"):
        assert expected in kinds
    assert events[-1].response.status == "completed"
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.output_audio.delta")
    assert len(audio) == RATE * 2
