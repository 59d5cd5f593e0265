"""A conversation that survives a misbehaving server: link drops, close codes, session expiry,
slow replies, fatal errors, session recycling, barge-in. Each against the local backend with
its fault switches (or a tiny hostile server), end to end through the CLI."""

from __future__ import annotations

import base64
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from test_replay import TWO_TURNS, clean_env, cli, messages
from trio_websocket import serve_websocket

from r2d2voice.appliance.pipeline import Context, LinkPolicy, run_conversation
from r2d2voice.audio.pcm import FRAME_BYTES, FRAME_SAMPLES
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.localbackend.server import BackendConfig, Faults, serve_local
from r2d2voice.realtime import protocol as p


class Observed:
    """Every client event the local backend received, per service session."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, session_id: str, event: dict[str, Any]) -> None:
        self.events.append((session_id, event))

    def sessions(self) -> list[str]:
        seen: list[str] = []
        for sid, _ in self.events:
            if sid not in seen:
                seen.append(sid)
        return seen

    def of_type(self, type_: str, session: str | None = None) -> list[dict[str, Any]]:
        return [e for sid, e in self.events
                if e.get("type") == type_ and (session is None or sid == session)]


@asynccontextmanager
async def server(faults: Faults, observed: Observed | None = None,
                 **kw: Any) -> AsyncIterator[str]:
    cfg = BackendConfig(realtime_factor=20, faults=faults, observer=observed, **kw)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_local, "127.0.0.1", 0, cfg)
        yield f"ws://127.0.0.1:{port}/v1/realtime"
        nursery.cancel_scope.cancel()


def sessions_table(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM sessions ORDER BY started_at, id")]
    con.close()
    return rows


async def replay(tmp_path: Path, url: str, *extra: str, env: dict[str, str] | None = None
                 ) -> trio.CompletedProcess[bytes]:
    return await cli("replay", str(TWO_TURNS), "--backend", "local", "--url", url,
                     "--db", str(tmp_path / "c.db"), *extra, cwd=tmp_path, env=env,
                     timeout=90)


@pytest.mark.parametrize("faults", [
    Faults(abort_after_responses=1),
    Faults(close_after_responses=1, close_code=1011),
    Faults(expire_after_responses=1),
], ids=["tcp-abort", "close-1011", "session-expired"])
async def test_two_link_drops_lose_nothing_and_carry_the_context(
    tmp_path: Path, faults: Faults
) -> None:
    observed = Observed()
    async with server(faults, observed) as url:
        r = await replay(tmp_path, url)
    assert r.returncode == 0, r.stderr.decode()
    db = tmp_path / "c.db"
    # every transcript the server sent is stored, once
    rows = messages(db)
    assert [m["role"] for m in rows] == ["user", "assistant", "user", "assistant"]
    assert len({m["item_id"] for m in rows}) == 4
    # one stored session per connection, each continuing the previous one
    sessions = sessions_table(db)
    assert len(sessions) == 3
    assert sessions[0]["previous_session_id"] is None
    for prev, cur in itertools.pairwise(sessions):
        assert cur["previous_session_id"] == prev["id"] and cur["ended_at"]
    reconnects = sum(json.loads(s["metadata"])["stats"]["reconnects"] for s in sessions)
    assert reconnects == 2
    # the new sessions were told what had been said, before any audio
    svc = observed.sessions()
    assert len(svc) == 3
    second = observed.of_type("conversation.item.create", svc[1])
    assert [(c["item"]["role"], c["item"]["content"][0]["text"]) for c in second] == \
        [(m["role"], m["text"]) for m in rows[:2]]
    assert len(observed.of_type("conversation.item.create", svc[2])) == 4
    first_types = [e["type"] for sid, e in observed.events if sid == svc[1]]
    assert first_types.index("conversation.item.create") < \
        first_types.index("input_audio_buffer.append")


async def test_slow_replies_are_waited_for(tmp_path: Path) -> None:
    async with server(Faults(reply_delay_s=1.5)) as url:
        r = await replay(tmp_path, url)
    assert r.returncode == 0, r.stderr.decode()
    assert [m["role"] for m in messages(tmp_path / "c.db")] == ["user", "assistant"] * 2


async def test_session_is_recycled_before_its_limit_with_context(tmp_path: Path) -> None:
    import soundfile as sf

    # hello, 4 s of quiet, hello: the 3 s session limit falls in the reply to the first turn,
    # and the connection is recycled in the quiet after it
    hello, rate = sf.read(TWO_TURNS.parent / "hello.wav", dtype="int16")
    wav = tmp_path / "quiet_gap.wav"
    sf.write(wav, np.concatenate([hello, np.zeros(4 * rate, np.int16), hello]), rate)
    observed = Observed()
    env = clean_env(HOME=str(tmp_path), R2D2_SESSION_MAX_MINUTES="0.05")  # 3 s
    async with server(Faults(), observed) as url:
        r = await cli("replay", str(wav), "--backend", "local", "--url", url, "--db",
                      str(tmp_path / "c.db"), "--speed", "realtime", cwd=tmp_path, env=env,
                      timeout=90)
    assert r.returncode == 0, r.stderr.decode()
    assert "recycled the connection" in r.stderr.decode()
    assert [m["role"] for m in messages(tmp_path / "c.db")] == ["user", "assistant"] * 2
    sessions = sessions_table(tmp_path / "c.db")
    assert len(sessions) >= 2 and sessions[1]["previous_session_id"] == sessions[0]["id"]
    assert observed.of_type("conversation.item.create", observed.sessions()[1])


@pytest.mark.parametrize("code", ["insufficient_quota", "invalid_api_key",
                                  "billing_hard_limit_reached", "model_not_found"])
async def test_fatal_service_errors_exit_3_after_one_try(tmp_path: Path, code: str) -> None:
    connections = 0

    async def hostile(request: Any) -> None:
        nonlocal connections
        connections += 1
        ws = await request.accept()
        await ws.send_message(json.dumps({
            "type": "session.created", "event_id": "event_1",
            "session": {"id": "sess_x", "object": "realtime.session", "type": "realtime"}}))
        await ws.send_message(json.dumps({
            "type": "error", "event_id": "event_2",
            "error": {"type": "invalid_request_error", "code": code,
                      "message": f"The service says {code}."}}))
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        srv = await nursery.start(serve_websocket, hostile, "127.0.0.1", 0, None)
        r = await replay(tmp_path, f"ws://127.0.0.1:{srv.port}/v1/realtime")
        nursery.cancel_scope.cancel()
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert f"The service says {code}." in err and "Traceback" not in err
    assert connections == 1
    con = sqlite3.connect(tmp_path / "c.db")
    assert (code,) in con.execute("SELECT code FROM errors").fetchall()


async def test_barge_in_truncates_the_service_copy_at_the_played_position(
    tmp_path: Path
) -> None:
    observed = Observed()
    async with server(Faults(reply_seconds=6.0), observed) as url:
        r = await replay(tmp_path, url, "--speed", "realtime")
    assert r.returncode == 0, r.stderr.decode()
    first = next(m for m in messages(tmp_path / "c.db") if m["role"] == "assistant")
    assert first["interrupted"] == 1
    truncates = observed.of_type("conversation.item.truncate")
    assert [(t["item_id"], t["audio_end_ms"]) for t in truncates] == \
        [(first["item_id"], first["played_ms"])]
    exported = await cli("export", "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    rows = [json.loads(line) for line in exported.stdout.decode().splitlines()]
    cut = next(r for r in rows if r["item_id"] == first["item_id"])
    assert cut["interrupted"] is True and cut["played_ms"] == first["played_ms"]


class LiveTone:
    """A live source (drops when full, like capture): 1 s tone bursts with 1.5 s pauses."""

    live = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        t = np.arange(24000) / 24000
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
        cycle = np.concatenate([tone, np.zeros(36000, "<i2")]).tobytes()
        self.data = cycle * int(seconds / 2.5 + 1)
        self.dropped = 0

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        async with send:
            start = trio.current_time()
            for i in range(int(self.seconds / 0.02)):
                await trio.sleep_until(start + i * 0.02)
                try:
                    send.send_nowait(self.data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
                except trio.WouldBlock:
                    self.dropped += 1
                except trio.BrokenResourceError:
                    return


class NullSink:
    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        async with receive:
            async for chunk in receive:
                buffer.push(chunk.item_id, chunk.pcm)
                buffer.read(buffer.queued_samples())


class MemorySessions:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.records: list[tuple[str, Any]] = []

    async def begin(self, previous: str | None) -> str:
        sid = f"s{len(self.rows)}"
        self.rows[sid] = {"previous": previous}
        return sid

    async def end(self, session_id: str, stats: dict[str, int]) -> None:
        self.rows[session_id]["stats"] = stats

    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]:
        turns = [(a.role, a.text) for sid, a in self.records
                 if isinstance(a, p.StoreMessage) and sid in chain]
        return turns[-limit:]

    async def record(self, session_id: str, actions: list[Any]) -> None:
        self.records += [(session_id, a) for a in actions]


async def test_live_audio_captured_while_disconnected_is_dropped_not_sent_stale() -> None:
    from r2d2voice.link.transport import Endpoint

    observed = Observed()
    sessions = MemorySessions()
    source = LiveTone(seconds=7.0)
    async with server(Faults(abort_after_responses=1), observed) as url:
        with trio.fail_after(30):
            ctx = await run_conversation(
                Endpoint(url, "gpt-realtime-2.1"), p.SessionConfig(instructions="x"),
                source, NullSink(), sessions, sessions.record,
                policy=LinkPolicy(backoff_initial=0.8, duplex="full"))
    assert ctx.stats.reconnects >= 1
    # frames that waited in the queue during the outage were thrown away on reconnecting
    assert ctx.stats.frames_dropped > 0
    sent = sum(len(base64.b64decode(e["audio"])) // FRAME_BYTES
               for e in observed.of_type("input_audio_buffer.append"))
    assert sent == ctx.stats.frames_sent
    assert sent + ctx.stats.frames_dropped + source.dropped == int(7.0 / 0.02)
    # and the conversation went on in the new session
    roles = [a.role for _, a in sessions.records if isinstance(a, p.StoreMessage)]
    assert roles.count("assistant") >= 2
    assert sessions.rows["s1"]["previous"] == "s0"
    assert FRAME_SAMPLES == 480
