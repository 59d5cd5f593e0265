"""A conversation that survives a misbehaving service: link drops, close codes, session expiry,
slow replies, late or failed transcripts, junk, session recycling, barge-in, stale live audio.
On a MockClock against the scripted service over the in-memory transport; one run per kind of
failure end to end (real sockets, the local backend, the CLI and SQLite) at the bottom."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
import trio
from fake_service import FakeService, MemorySessions, NullSink, Script, fast, realtime, speech
from local_link import run_conversation
from support import SAMPLES, cli, local_backend
from trio_websocket import serve_websocket

from r2d2voice.appliance.pipeline import RunResult
from r2d2voice.appliance.sinks import WavSink
from r2d2voice.audio.pcm import FRAME_BYTES
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.link.state import LinkPolicy
from r2d2voice.link.transport import Endpoint
from r2d2voice.protocol.actions import StoreError, StoreInterrupted, StoreMessage
from r2d2voice.realtime.client_events import SessionConfig

CFG = SessionConfig(instructions="x")
ENDPOINT = Endpoint("mem://fake", "m")
TWO_TURNS = SAMPLES / "two_turns.wav"


async def converse(service: FakeService, source: Any, sink: Any = None,
                   sessions: MemorySessions | None = None, **kw: Any) -> tuple[RunResult,
                                                                              MemorySessions]:
    sessions = sessions or MemorySessions()
    kw.setdefault("rng", random.Random(0))
    ctx = await run_conversation(ENDPOINT, CFG, source, sink or NullSink(), sessions,
                                 sessions.record, connect=service.connect, **kw)
    return ctx, sessions


@pytest.mark.parametrize("drop", ["abort", "close", "expire"])
async def test_two_link_drops_lose_nothing_and_carry_the_context(
    autojump_clock, drop: str
) -> None:
    service = FakeService(Script(drop_after=1, drop=drop))  # every connection drops
    ctx, sessions = await converse(service, fast(1.0, 1.0, 1.2))
    # every transcript the service sent is stored, once
    msgs = sessions.messages()
    assert [m.role for _, m in msgs] == ["user", "assistant", "user", "assistant"]
    assert len({m.item_id for _, m in msgs}) == 4 and not any(m.partial for _, m in msgs)
    # one session per connection, each continuing the previous one
    assert [r["previous"] for r in sessions.rows.values()] == [None, "s0", "s1"]
    assert sum(r["stats"]["reconnects"] for r in sessions.rows.values()) == 2
    assert ctx.stats.reconnects == 2 and ctx.session_ids == ["s0", "s1", "s2"]
    # the new sessions were told what had been said, before any audio
    assert service.connections == 3
    second = service.of_type("conversation.item.create", 1)
    assert [(c["item"]["role"], c["item"]["content"][0]["text"]) for c in second] == \
        [(m.role, m.text) for _, m in msgs[:2]]
    assert len(service.of_type("conversation.item.create", 2)) == 4
    types = [e["type"] for n, e in service.events if n == 1]
    assert types.index("conversation.item.create") < types.index("input_audio_buffer.append")
    lost = [e.message for e in sessions.of_type(StoreError)]
    expected = {"abort": "close code 1006", "close": "close code 1011",
                "expire": "session ended by the service (session_expired)"}[drop]
    assert lost.count(expected) == 2


async def test_slow_replies_are_waited_for(autojump_clock) -> None:
    service = FakeService(Script(reply_delay=5.0))
    ctx, sessions = await converse(service, fast(1.0, 1.0, 1.0))
    assert sessions.roles() == ["user", "assistant"] * 2
    # fast mode waited for each reply: nothing was talked over
    assert ctx.stats.interruptions == 0 and not sessions.of_type(StoreInterrupted)


async def test_a_late_user_transcript_is_waited_for_and_keeps_its_place(autojump_clock) -> None:
    service = FakeService(Script(transcript_delay=4.0))  # long after the 1 s reply
    _, sessions = await converse(service, fast(1.0, 1.0))
    msgs = [m for _, m in sessions.messages()]
    assert [(m.role, m.seq) for m in msgs] == [("user", 1), ("assistant", 2)]
    written = [a for _, a in sessions.records if isinstance(a, StoreMessage)]
    assert [m.role for m in written] == ["assistant", "user"]  # arrival order differs


async def test_a_failed_transcription_is_stored_and_the_conversation_goes_on(
    autojump_clock
) -> None:
    service = FakeService(Script(transcription_fails=True))
    _, sessions = await converse(service, fast(1.0, 1.0, 1.0))
    assert sessions.roles() == ["assistant", "assistant"]
    failed = [e for e in sessions.of_type(StoreError) if e.type == "transcription_failed"]
    assert len(failed) == 2 and "could not transcribe" in failed[0].message


async def test_a_junk_sending_service_does_not_break_the_conversation(autojump_clock) -> None:
    service = FakeService(Script(junk=True))
    ctx, sessions = await converse(service, fast(1.0, 1.0, 1.0))
    assert sessions.roles() == ["user", "assistant"] * 2
    assert ctx.stats.junk_messages == 4  # non-JSON and binary, twice
    assert [e.code for e in sessions.of_type(StoreError)] == ["fake_junk"] * 2
    assert ctx.stats.service_errors == 2


async def test_session_is_recycled_at_a_quiet_moment_with_context(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    # turn, 4 s of quiet, turn: the 2 s session limit falls in the reply to the first turn;
    # the connection is recycled in the quiet after it, not during the reply
    service = FakeService(Script(reply_seconds=1.5))
    policy = LinkPolicy(session_max_seconds=2.0)
    with caplog.at_level(logging.INFO):
        ctx, sessions = await converse(service, realtime(1.0, 4.0, 1.0), policy=policy)
    assert "recycled the connection" in caplog.text
    assert sessions.roles() == ["user", "assistant"] * 2
    assert not any(m.partial for _, m in sessions.messages())
    assert not sessions.of_type(StoreInterrupted) and ctx.stats.reconnects == 0
    assert len(sessions.rows) >= 2 and sessions.rows["s1"]["previous"] == "s0"
    assert [c["item"]["role"] for c in service.of_type("conversation.item.create", 1)] == \
        ["user", "assistant"]
    assert not [e for e in sessions.of_type(StoreError) if e.type == "connection_lost"]


async def test_talking_over_a_long_reply_truncates_it_at_what_was_played(
    autojump_clock, tmp_path: Path
) -> None:
    """The second turn starts 1 s into a 6 s reply (real-time source and speaker)."""
    service = FakeService(Script(reply_seconds=6.0))
    sink = WavSink(str(tmp_path / "reply.wav"), realtime=True)
    ctx, sessions = await converse(service, realtime(1.0, 1.5, 1.0), sink,
                                   buffer=PlayoutBuffer(clock=trio.current_time))
    first = next(m for _, m in sessions.messages() if m.role == "assistant")
    [cut] = sessions.of_type(StoreInterrupted)
    assert cut.item_id == first.item_id and cut.seq == first.seq
    assert 500 < cut.played_ms < 2000 and ctx.stats.interruptions == 1
    truncates = service.of_type("conversation.item.truncate")
    assert [(t["item_id"], t["audio_end_ms"]) for t in truncates] == \
        [(cut.item_id, cut.played_ms)]
    assert first.partial  # the cancelled reply keeps what was said of it
    # the file holds what was played: the cut first reply, then the whole second one
    reply = sf.read(tmp_path / "reply.wav", dtype="int16")[0]
    assert len(reply) / 24000 == pytest.approx(cut.played_ms / 1000 + 6.0, abs=0.05)


class LiveTone:
    """A live source (drops when full, like capture): 1 s tone bursts with 1.5 s pauses."""

    live = True
    resends = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.data = speech(*[1.0, 1.5] * int(seconds / 2.5 + 1)).astype("<i2").tobytes()
        self.frames_dropped = 0

    def set_urgent(self, urgent: bool) -> None:
        pass

    async def run(self, send: trio.MemorySendChannel[bytes], turns: object) -> None:
        async with send:
            start = trio.current_time()
            for i in range(int(self.seconds / 0.02)):
                await trio.sleep_until(start + i * 0.02)
                try:
                    send.send_nowait(self.data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
                except trio.WouldBlock:
                    self.frames_dropped += 1


async def test_live_audio_captured_while_disconnected_is_dropped_not_sent_stale(
    autojump_clock
) -> None:
    service = FakeService(Script(drop_after=1, drop="abort", drop_on=(0,)))
    source = LiveTone(seconds=7.0)
    ctx, sessions = await converse(service, source,
                                   policy=LinkPolicy(backoff_initial=3.0, duplex="full"),
                                   rng=random.Random(1))
    assert ctx.stats.reconnects == 1
    # frames that waited in the queue during the outage were thrown away on reconnecting
    assert ctx.stats.frames_dropped > 0
    sent = sum(len(base64.b64decode(e["audio"])) // FRAME_BYTES
               for e in service.of_type("input_audio_buffer.append"))
    assert sent == ctx.stats.frames_sent
    # every frame captured was sent or counted as dropped in a session row (the stale ones,
    # and those the full queue turned away while reconnecting)
    dropped = sum(r["stats"]["frames_dropped"] for r in sessions.rows.values())
    assert dropped > ctx.stats.frames_dropped
    assert sent + dropped == int(7.0 / 0.02)
    # and the conversation went on in the new session
    assert sessions.roles().count("assistant") >= 2
    assert sessions.rows["s1"]["previous"] == "s0"


# --------------------------------------------------------------------------- end to end


def messages(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute(
        "SELECT m.*, s.previous_session_id, s.ended_at, s.metadata FROM messages m "
        "JOIN sessions s ON s.id = m.session_id ORDER BY s.started_at, s.id, m.seq")]
    con.close()
    return rows


async def test_a_dropped_link_end_to_end_loses_nothing(tmp_path: Path) -> None:
    """Real sockets, the local backend resetting TCP after the replies, the CLI, SQLite."""
    from r2d2voice.localbackend.server import Faults

    async with local_backend(realtime_factor=20, faults=Faults(abort_after_responses=2)) as url:
        r = await cli("replay", str(TWO_TURNS), "--backend", "local", "--url", url,
                      "--db", str(tmp_path / "c.db"), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    rows = messages(tmp_path / "c.db")
    assert [m["role"] for m in rows] == ["user", "assistant", "user", "assistant"]
    con = sqlite3.connect(tmp_path / "c.db")
    chain = con.execute("SELECT id, previous_session_id, ended_at, metadata FROM sessions "
                        "ORDER BY started_at, id").fetchall()
    errors = con.execute("SELECT type FROM errors").fetchall()
    con.close()
    assert len(chain) == 2 and errors == [("connection_lost",)]
    for (prev, *_), (_, cur_prev, ended, _) in itertools.pairwise(chain):
        assert cur_prev == prev and ended
    assert [json.loads(m)["stats"]["reconnects"] for *_, m in chain] == [0, 1]


async def test_a_fatal_service_error_exits_3_end_to_end(tmp_path: Path) -> None:
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
            "error": {"type": "invalid_request_error", "code": "insufficient_quota",
                      "message": "The service says insufficient_quota."}}))
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        srv = await nursery.start(serve_websocket, hostile, "127.0.0.1", 0, None)
        r = await cli("replay", str(TWO_TURNS), "--backend", "local", "--url",
                      f"ws://127.0.0.1:{srv.port}/v1/realtime", "--db", str(tmp_path / "c.db"),
                      cwd=tmp_path)
        nursery.cancel_scope.cancel()
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert "The service says insufficient_quota." in err and "Traceback" not in err
    assert connections == 1
    con = sqlite3.connect(tmp_path / "c.db")
    assert ("insufficient_quota",) in con.execute("SELECT code FROM errors").fetchall()
