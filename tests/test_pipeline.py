"""The pipeline's channel policies and link supervision, in-process against the local backend:
a slow database never loses a transcript, a stuck speaker never stalls the conversation, a
silent (half-open) link is noticed by ping and replaced."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import trio
from test_replay import TWO_TURNS
from test_resilience import MemorySessions, NullSink

from r2d2voice.appliance import pipeline
from r2d2voice.appliance.pipeline import LinkPolicy, run_conversation
from r2d2voice.appliance.replay import FileSource, VadParams
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.transport import Endpoint
from r2d2voice.localbackend.server import BackendConfig, serve_local
from r2d2voice.realtime import protocol as p

CFG = p.SessionConfig(instructions="x")


@asynccontextmanager
async def backend(**kw: Any) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_local, "127.0.0.1", 0,
                                   BackendConfig(realtime_factor=20, **kw))
        yield f"ws://127.0.0.1:{port}/v1/realtime"
        nursery.cancel_scope.cancel()


def two_turns() -> FileSource:
    pcm, rate = sf.read(TWO_TURNS, dtype="int16")
    return FileSource(soxr.resample(pcm, rate, 24000).astype("int16"), realtime=False,
                      vad=VadParams())


def roles(sessions: MemorySessions) -> list[str]:
    return [a.role for _, a in sessions.records if isinstance(a, p.StoreMessage)]


async def test_a_slow_database_makes_the_downlink_wait_never_drop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline, "RECORDS_BOUND", 1)

    class SlowSessions(MemorySessions):
        async def record(self, session_id: str, actions: list[Any]) -> None:
            await trio.sleep(0.3)  # a database on a slow SD card
            await super().record(session_id, actions)

    sessions = SlowSessions()
    async with backend() as url:
        with caplog.at_level(logging.WARNING), trio.fail_after(60):
            ctx = await run_conversation(Endpoint(url, "m"), CFG, two_turns(), NullSink(),
                                         sessions, sessions.record)
    assert roles(sessions) == ["user", "assistant", "user", "assistant"]
    assert ctx.stats.record_waits > 0
    assert "recorder is behind" in caplog.text


async def test_a_stuck_speaker_never_stalls_the_conversation(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "AUDIO_BOUND", 2)

    class StuckSink:
        """Takes one chunk a second: a speaker whose device blocked."""

        async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                      buffer: PlayoutBuffer) -> None:
            async with receive:
                async for _ in receive:
                    await trio.sleep(1.0)

    sessions = MemorySessions()
    async with backend() as url:
        with trio.fail_after(60):
            ctx = await run_conversation(Endpoint(url, "m"), CFG, two_turns(), StuckSink(),
                                         sessions, sessions.record)
    # both turns answered and stored although the speaker took almost nothing
    assert roles(sessions) == ["user", "assistant", "user", "assistant"]
    assert ctx.stats.audio_chunks_dropped > 0


async def test_a_silent_link_is_found_by_ping_and_replaced() -> None:
    """A proxy that goes silent after the first reply (no FIN, no RST: a half-open link)."""
    connections = 0
    async with backend() as url, trio.open_nursery() as nursery:
        port = int(url.split(":")[2].split("/")[0])

        async def proxy(client: trio.SocketStream) -> None:
            nonlocal connections
            connections += 1
            silent_after = 8.0 if connections == 1 else None  # only the first one dies
            upstream = await trio.open_tcp_stream("127.0.0.1", port)
            async with client, upstream, trio.open_nursery() as n:
                deadline = trio.current_time() + silent_after if silent_after else None

                async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                    async for chunk in a:
                        if deadline is not None and trio.current_time() > deadline:
                            await trio.sleep_forever()  # black hole
                        await b.send_all(chunk)
                    n.cancel_scope.cancel()

                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

        listeners = await nursery.start(trio.serve_tcp, proxy, 0)
        proxy_url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1/realtime"
        sessions = MemorySessions()

        pcm, rate = sf.read(TWO_TURNS, dtype="int16")
        speech = soxr.resample(pcm, rate, 24000).astype("int16")
        # turn one, 10 s of quiet (the link dies in it), turn two: real time, like a person
        audio = np.concatenate([speech[: 24000 * 3], np.zeros(24000 * 10, "int16"),
                                speech[24000 * 3:]])
        source = FileSource(audio, realtime=True, vad=VadParams())
        policy = LinkPolicy(ping_interval=1.0, ping_timeout=1.0, backoff_initial=0.2)
        with trio.fail_after(60):
            ctx = await run_conversation(Endpoint(proxy_url, "m"), CFG, source, NullSink(),
                                         sessions, sessions.record, policy=policy)
        nursery.cancel_scope.cancel()
    assert connections == 2
    assert ctx.stats.reconnects == 1
    assert roles(sessions) == ["user", "assistant", "user", "assistant"]
    errors = [a for _, a in sessions.records if isinstance(a, p.StoreError)]
    assert any(e.message == "ping timeout" for e in errors)
