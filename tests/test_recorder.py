"""The appliance's side of the store: protocol records → writer calls, AsyncStore, and one clock
discipline (wall time is a label; order comes from the conversation)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import trio
from storage_support import T0, SteppedClock

from r2d2voice.protocol.actions import (
    BargeIn,
    Play,
    StoreError,
    StoreInterrupted,
    StoreLatency,
    StoreMessage,
    StoreResponse,
    StoreSession,
)
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.reports.export import export_command
from r2d2voice.reports.sessions import sessions_command
from r2d2voice.reports.stats import stats_command
from r2d2voice.storage.database import Store
from r2d2voice.storage.recorder import AsyncStore, record_calls
from r2d2voice.storage.timestamps import format_ts
from r2d2voice.storage.writer import Writer

USAGE = {"input_token_details": {"text_tokens": 3, "audio_tokens": 40, "cached_tokens": 0},
         "output_token_details": {"text_tokens": 7, "audio_tokens": 90}}


def test_each_record_maps_to_its_writer_call() -> None:
    assert record_calls(StoreMessage("user", "u1", 1, "hi", raw='{"e": 1}')) == [
        (Writer.upsert_message, {"role": "user", "item_id": "u1", "seq": 1, "text": "hi",
                                 "response_id": None, "raw_event": '{"e": 1}'})]
    assert record_calls(StoreInterrupted("a1", 2, 640)) == [
        (Writer.mark_interrupted, {"item_id": "a1", "seq": 2, "played_ms": 640})]
    details = {"type": "failed", "error": {"code": "server_error"}}
    assert record_calls(StoreResponse("r1", "failed", USAGE, details, 312.4)) == [
        (Writer.record_response, {"response_id": "r1", "status": "failed", "usage": USAGE,
                                  "status_details": details, "first_audio_ms": 312.4})]
    assert record_calls(StoreLatency("r1", 350.0)) == [
        (Writer.set_response_latency, {"response_id": "r1", "first_played_ms": 350.0})]
    assert record_calls(StoreError("server_error", None, "boom", fatal=False)) == [
        (Writer.record_error, {"source": "service", "type": "server_error", "code": None,
                               "message": "boom"})]
    assert record_calls(StoreSession("sess_1", "gpt-realtime")) == [
        (Writer.set_service_session_id, {"service_session_id": "sess_1",
                                         "model": "gpt-realtime"})]
    assert record_calls(StoreToolCall("call_1", "fc_1", "r1", 3, "turn_head", "{}")) == [
        (Writer.record_tool_call, {"call_id": "call_1", "item_id": "fc_1", "response_id": "r1",
                                   "seq": 3, "name": "turn_head", "arguments": "{}"})]
    assert record_calls(StoreToolResult("call_1", "timeout", "too slow", None, 5001.5)) == [
        (Writer.record_tool_result, {"call_id": "call_1", "status": "timeout",
                                     "output": "too slow", "exit_code": None,
                                     "duration_ms": 5001.5})]
    with pytest.raises(ValueError, match="status"):
        StoreToolResult("call_1", "fine")
    for not_a_record in (Play("a1", b"\0\0"), BargeIn("u2"), "text"):
        with pytest.raises(TypeError, match="not a record"):
            record_calls(not_a_record)


async def test_a_batch_is_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    store = await AsyncStore.open(db)
    sid = await store.start_session(backend="local", model="m", voice=None)
    await store.record(sid, [StoreSession("sess_1", None),
                             StoreMessage("assistant", "a1", 2, "Hel", partial=True),
                             StoreMessage("assistant", "a1", 2, "Hello", response_id="r1"),
                             StoreResponse("r1", "failed", status_details={"reason": "x"})])
    # A record the writer refuses (a role the schema does not know) rolls back its batch.
    with pytest.raises(ValueError, match="role"):
        await store.record(sid, [StoreMessage("user", "u2", 3, "lost"),
                                 StoreMessage("system", "s1", 4, "refused")])
    # Something that is not a record fails before anything is written.
    with pytest.raises(TypeError):
        await store.record(sid, [StoreMessage("user", "u3", 5, "lost too"), Play("a1", b"")])
    await store.aclose()
    with Store.open(db, create=False) as r:
        assert [(m.seq, m.text, m.response_id) for m in r.read.iter_messages()] == [
            (2, "Hello", "r1")]
        assert r.read.get_session(sid).service_session_id == "sess_1"
        row = r.conn.execute("SELECT status, status_details, done_at IS NOT NULL"
                             " FROM responses").fetchone()
        assert row == ("failed", '{"reason": "x"}', 1)


async def test_calls_from_many_tasks_run_one_at_a_time(tmp_path: Path) -> None:
    """One connection, many writers: without the single-slot limiter two worker threads would
    interleave transactions on it ("cannot start a transaction within a transaction")."""
    store = await AsyncStore.open(tmp_path / "r2.db")
    sid = await store.start_session(backend="local", model="m", voice=None)

    async def talk(task: int) -> None:
        for i in range(10):
            seq = task * 100 + i
            await store.record(sid, [StoreMessage("user", f"u{seq}", seq, f"t{seq}"),
                                     StoreResponse(f"r{seq}", "in_progress")])

    async with trio.open_nursery() as nursery:
        for task in range(8):
            nursery.start_soon(talk, task)
    turns = await store.recent_turns([sid], 1000)
    await store.aclose()
    assert len(turns) == 80
    assert [t for _, t in turns] == [f"t{k * 100 + i}" for k in range(8) for i in range(10)]


async def test_end_session_stamps_the_end_and_stores_the_counters(tmp_path: Path) -> None:
    clock = SteppedClock()
    store = await AsyncStore.open(tmp_path / "r2.db", now=clock)
    sid = await store.start_session(backend="local", model="m", voice="ash",
                                    metadata={"command": "replay"})
    clock.step(minutes=5)
    await store.end_session(sid, {"frames_dropped": 2})
    await store.record_error(sid, source="local", type="OSError", code=None, message="gone")
    await store.aclose()
    with Store.open(tmp_path / "r2.db", create=False) as r:
        row = r.read.get_session(sid)
        assert (row.started_at, row.ended_at) == (format_ts(T0), format_ts(clock.now))
        [stats] = r.read.session_stats()
        assert stats.stats == {"frames_dropped": 2}
        meta = r.conn.execute("SELECT metadata FROM sessions").fetchone()[0]
        assert json.loads(meta)["command"] == "replay"
        assert [(e.source, e.message) for e in r.read.list_errors()] == [("local", "gone")]


async def test_closed_store_refuses_more_work(tmp_path: Path) -> None:
    store = await AsyncStore.open(tmp_path / "r2.db")
    await store.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await store.start_session(backend="local", model="m", voice=None)
    assert str(store.status) == "database closed"


# ---------------------------------------------------------------------------- clock steps


async def test_a_stepped_wall_clock_changes_labels_never_order(tmp_path: Path) -> None:
    """A board without a battery clock: NTP steps the wall clock +3 days, then -1 hour, in the
    middle of a conversation that reconnects. Export, sessions and the context re-sent after
    the reconnect stay in conversation order; latencies are the measured intervals."""
    db = tmp_path / "r2.db"
    clock = SteppedClock()
    store = await AsyncStore.open(db, now=clock)
    clock.step(days=3)  # NTP's first correction at boot
    a = await store.start_session(backend="local", model="m", voice=None)
    await store.record(a, [StoreSession("sess_a", "m")])
    clock.step(seconds=2)
    # Turn 1: the user's transcript arrives after the reply (it keeps its item's seq).
    await store.record(a, [StoreResponse("r1", "in_progress"),
                           StoreMessage("assistant", "a1", 2, "answer one", "r1")])
    clock.step(seconds=1)
    await store.record(a, [StoreResponse("r1", "completed", USAGE, first_audio_ms=420.0),
                           StoreLatency("r1", 510.0),
                           StoreMessage("user", "u1", 1, "question one")])
    clock.step(hours=-1)  # NTP steps back an hour, mid-conversation
    await store.record(a, [StoreMessage("user", "u2", 3, "question two"),
                           StoreResponse("r2", "in_progress"),
                           StoreMessage("assistant", "a2", 4, "answer two", "r2")])
    clock.step(seconds=1)
    await store.record(a, [StoreResponse("r2", "completed", USAGE, first_audio_ms=380.0),
                           StoreLatency("r2", 450.0)])
    await store.end_session(a, {"reconnects": 0})
    # The connection drops; the next session continues this one, with the context re-sent.
    b = await store.start_session(backend="local", model="m", voice=None,
                                  previous_session_id=a)
    context = await store.recent_turns([a, b], 10)
    await store.record(b, [StoreMessage("user", "u1", 1, "question three"),
                           StoreMessage("assistant", "a1", 2, "answer three")])
    await store.aclose()

    in_order = ["question one", "answer one", "question two", "answer two", "question three",
                "answer three"]
    assert [t for _, t in context] == in_order[:4]
    with Store.open(db, create=False) as r:
        [sa, sb] = r.read.list_sessions()
        assert (sa.id, sb.id) == (a, b)
        assert sb.started_at < sa.started_at and b < a  # the labels disagree; order does not
    out = io.StringIO()
    export_command(db, out=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [row["text"] for row in rows] == in_order
    assert [(row["session_id"], row["seq"]) for row in rows] == [
        (a, 1), (a, 2), (a, 3), (a, 4), (b, 1), (b, 2)]
    # The late transcript's label is when it was written, 3 s after the start: labels only.
    assert rows[0]["created_at"] == format_ts(T0.replace(day=24, second=3))
    md = io.StringIO()
    export_command(db, fmt="markdown", out=md)
    assert md.getvalue().index(f"## Session {a}") < md.getvalue().index(f"## Session {b}")
    listing = io.StringIO()
    sessions_command(db, out=listing)
    assert [line.split()[0] for line in listing.getvalue().splitlines()[1:]] == [a, b]
    # Latencies are what the appliance measured (monotonic), not differences of labels.
    stats = stats_command(db, fmt="json", out=io.StringIO())["latency_ms"]
    assert stats["speech_stopped_to_first_audio_received"] == {
        "n": 2, "p50": 380, "p90": 420, "p99": 420}
    assert stats["speech_stopped_to_first_audio_played"] == {
        "n": 2, "p50": 450, "p90": 510, "p99": 510}
    # Time filters still select by label, as the user asked: before the +3 days' first hour.
    until = format_ts(T0.replace(day=24, hour=9, minute=0))
    selected = io.StringIO()
    export_command(db, out=selected, until=until)
    assert [json.loads(line)["text"] for line in selected.getvalue().splitlines()] == [
        "question two", "answer two", "question three", "answer three"]
