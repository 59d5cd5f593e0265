"""Keeping only what you should: retention deletes whole old conversations (only shipped ones
when shipping is configured), the file shrinks, and a running writer never notices."""

from __future__ import annotations

import io
import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from storage_support import T0, SteppedClock

from r2d2voice.errors import UsageError
from r2d2voice.protocol.actions import StoreMessage
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.database import Store
from r2d2voice.storage.recorder import open_store
from r2d2voice.storage.retention import PruneResult, parse_age, prune, prune_command

DAY = timedelta(days=1)
TEXT = "a long enough sentence to fill pages " * 30


def conversation(s: Store, clock: SteppedClock, *, turns: int = 3,
                 previous: str | None = None) -> str:
    """A session with ``turns`` user/assistant turns, a response, a tool call and an error."""
    w = s.write
    sid = w.start_session(backend="local", model="m", voice=None, previous_session_id=previous)
    for i in range(turns):
        clock.step(seconds=1)
        w.upsert_message(sid, role="user", item_id=f"u{i}", seq=3 * i + 1, text=TEXT)
        w.record_tool_call(sid, call_id=f"c{i}", item_id=f"f{i}", response_id=f"r{i}",
                           seq=3 * i + 2, name="get_time", arguments="{}")
        w.record_response(sid, response_id=f"r{i}", status="completed")
        w.upsert_message(sid, role="assistant", item_id=f"a{i}", seq=3 * i + 3, text=TEXT)
    w.record_error(sid, source="service", type="x", code=None, message="oops")
    clock.step(seconds=1)
    w.end_session(sid)
    return sid


def empty_size(tmp_path: Path) -> int:
    """The size of a new database with nothing in it (the schema's pages)."""
    path = tmp_path / "empty.db"
    Store.open(path).close()
    return os.path.getsize(path)


def counts(db: Path) -> dict[str, int]:
    with Store.open(db, create=False) as r:
        return {t: r.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("sessions", "messages", "responses", "errors", "tool_executions")}


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, SteppedClock, dict[str, str]]:
    """40 and 35 days ago: a chain (old2 continues old1); 31 days ago: old3, which the
    session 'recent' (yesterday) continues; an error with no session 40 days ago."""
    db = tmp_path / "r2.db"
    clock = SteppedClock(T0 - 40 * DAY)
    ids: dict[str, str] = {}
    with Store.open(db, now=clock) as s:
        s.write.record_error(None, source="local", type="OSError", code=None, message="boot")
        ids["old1"] = conversation(s, clock)
        clock.set(T0 - 35 * DAY)
        ids["old2"] = conversation(s, clock, previous=ids["old1"])
        clock.set(T0 - 31 * DAY)
        ids["old3"] = conversation(s, clock)
        clock.set(T0 - DAY)
        ids["recent"] = conversation(s, clock, previous=ids["old3"])
    clock.set(T0)
    return db, clock, ids


def test_prune_deletes_whole_old_conversations_and_nothing_else(history) -> None:
    db, clock, ids = history
    with Store.open(db, now=clock) as s:
        result = prune(s.conn, T0 - 30 * DAY)
        assert [r.id for r in s.read.list_sessions()] == [ids["old3"], ids["recent"]]
        # old3 is old, but 'recent' continues it: a conversation is kept whole.
        assert (result.sessions, result.rows) == (2, {
            "tool_executions": 6, "messages": 12, "responses": 6, "errors": 3})
        assert str(result).startswith("pruned 2 sessions older than 2025-10-22T09:30:00.000Z"
                                      " (6 tool executions, 12 messages, 6 responses, 3 errors")
        assert s.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # Nothing more to do until something else is old.
        assert str(prune(s.conn, T0 - 30 * DAY)) == (
            "nothing older than 2025-10-22T09:30:00.000Z to prune")
        result = prune(s.conn, T0)
        assert result.sessions == 2 and s.read.list_sessions() == []
    assert counts(db) == dict.fromkeys(counts(db), 0)


def test_a_session_with_recent_activity_is_not_old(history) -> None:
    db, clock, ids = history
    with Store.open(db, now=clock) as s:
        clock.set(T0 - 2 * DAY)  # a late transcript lands in old1 (e.g. after a long outage)
        s.write.upsert_message(ids["old1"], role="user", item_id="late", seq=99, text="late")
        # old1 is not old any more, and old2 is the rest of its conversation: both kept.
        assert [r.sessions for r in (prune(s.conn, T0 - 30 * DAY), prune(s.conn, T0 - DAY))] \
            == [0, 2]


def test_only_shipped_sessions_are_pruned_when_shipping_is_configured(history) -> None:
    db, clock, ids = history
    asked: list[list[str]] = []

    def only_shipped(conn: sqlite3.Connection, session_ids: list[str]) -> set[str]:
        assert conn.in_transaction  # asked inside the prune's transaction
        asked.append(list(session_ids))
        return {ids["old1"], ids["old2"]}  # not old3 yet

    with Store.open(db, now=clock) as s:
        result = prune(s.conn, T0 - 30 * DAY, only_shipped)
        assert asked == [sorted([ids["old1"], ids["old2"], ids["old3"]])]
        assert result.sessions == 2 and result.unshipped == 1
        assert "1 old sessions kept until they are shipped" in str(result)
        assert [r.id for r in s.read.list_sessions()] == [ids["old3"], ids["recent"]]
        # A conversation goes whole or not at all: old3 is shipped, 'recent' (its
        # continuation) is not yet, so both stay.
        result = prune(s.conn, T0, lambda conn, sids: set(sids) - {ids["recent"]})
        assert (result.sessions, result.unshipped) == (0, 1)
        assert [r.id for r in s.read.list_sessions()] == [ids["old3"], ids["recent"]]
        # Errors without a session cannot be checked against the shipper: kept.
        assert [e.message for e in s.read.list_errors() if e.session_id is None] == ["boot"]


def test_parse_age() -> None:
    assert parse_age("30d") == 30 * DAY == parse_age("30") == parse_age(" 30 D ")
    assert parse_age("2w") == 14 * DAY
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("90m") == timedelta(minutes=90)
    assert parse_age("1.5d") == timedelta(hours=36)
    assert parse_age("1m") == timedelta(minutes=1)
    for bad in ("-3d", "30 days", "d", "", "1y"):
        with pytest.raises(UsageError, match=r"--older-than: .* is not an age like 30d"):
            parse_age(bad)
    for young in ("0d", "0", "0.5m"):  # says what the least is
        with pytest.raises(UsageError, match=r"--older-than: .* is too young: an age is at "
                                             r"least 1 minute \(1m\)"):
            parse_age(young)


def test_prune_command(history, tmp_path: Path) -> None:
    db, clock, _ = history
    out = io.StringIO()
    result = prune_command(db, older_than="30d", now=clock, out=out)
    assert result.sessions == 2
    assert out.getvalue().startswith("pruned 2 sessions older than 2025-10-22T09:30:00.000Z")
    assert " MiB -> " in out.getvalue() and out.getvalue().count("\n") == 1
    # R2D2_RETENTION_DAYS is the default age; without either, say what is missing.
    out = io.StringIO()
    assert prune_command(db, retention_days=0.5, now=clock, out=out).sessions == 2
    with pytest.raises(UsageError, match=r"--older-than AGE .* or R2D2_RETENTION_DAYS"):
        prune_command(db, now=clock)
    missing = tmp_path / "nope.db"
    with pytest.raises(UsageError, match="no such database"):
        prune_command(missing, older_than="1d")
    assert not missing.exists()


def test_the_file_shrinks(tmp_path: Path) -> None:
    """New databases have incremental auto-vacuum: a prune gives the space back."""
    db = tmp_path / "r2.db"
    clock = SteppedClock(T0 - 60 * DAY)
    with Store.open(db, now=clock) as s:
        for _ in range(20):
            conversation(s, clock, turns=10)
        clock.set(T0)
        conversation(s, clock, turns=1)
    big = os.path.getsize(db)
    result = prune_command(db, older_than="30d", now=clock, out=io.StringIO())
    assert result.sessions == 20
    assert result.bytes_before == big
    # what the conversations took (the schema apart: an empty database's size)
    assert result.bytes_after == os.path.getsize(db)
    assert result.bytes_after - empty_size(tmp_path) < (big - empty_size(tmp_path)) // 5
    assert counts(db)["sessions"] == 1


def test_an_old_file_is_converted_to_incremental_vacuum_once(tmp_path: Path) -> None:
    from test_store import V3_SCHEMA, build

    db = tmp_path / "r2.db"
    build(db, V3_SCHEMA)
    clock = SteppedClock(T0 - 60 * DAY)
    with Store.open(db, now=clock) as s:  # migrated to v4, still auto_vacuum NONE
        assert s.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        for _ in range(20):
            conversation(s, clock, turns=10)
    big = os.path.getsize(db)
    clock.set(T0)
    result = prune_command(db, older_than="30d", now=clock, out=io.StringIO())
    empty = empty_size(tmp_path)
    assert result.sessions == 20 and os.path.getsize(db) - empty < (big - empty) // 5
    with Store.open(db, create=False) as r:
        assert r.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_prune_by_hand_while_run_keeps_writing(history) -> None:
    """WAL: `r2d2voice prune` (another connection) deletes and shrinks while the appliance's
    recorder writes; every record of the running conversation is stored, in order."""
    db, clock, ids = history
    async with open_store(db, now=clock) as store:
        sid = await store.start_session(backend="local", model="m", voice=None)
        pruned: list[PruneResult] = []

        async def talk() -> None:
            for i in range(1, 201):
                await store.record(sid, [StoreMessage("user", f"u{i}", i, f"live {i}")])
                await trio.sleep(0)

        async def prune_by_hand() -> None:
            pruned.append(await trio.to_thread.run_sync(
                lambda: prune_command(db, older_than="30d", now=clock, out=io.StringIO())))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            nursery.start_soon(prune_by_hand)
        assert store.status.state == "ok" and store.status.retries == 0
    assert pruned[0].sessions == 2
    with Store.open(db, create=False) as r:
        assert r.conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # space given back
        assert [m.text for m in r.read.iter_messages(sessions=[sid])] == [
            f"live {i}" for i in range(1, 201)]
        assert [s.id for s in r.read.list_sessions()] == [ids["old3"], ids["recent"], sid]


async def test_run_prunes_on_its_own_every_hour(
        history, autojump_clock: trio.testing.MockClock) -> None:
    db, clock, _ = history
    results: list[PruneResult] = []
    pruned = trio.Event()

    def on_prune(result: PruneResult) -> None:
        results.append(result)
        pruned.set()

    async with open_store(db, now=clock, retention=timedelta(days=30),
                          on_prune=on_prune) as store:
        await pruned.wait()  # at start
        assert results[0].sessions == 2
        pruned = trio.Event()
        clock.step(days=2)  # old3 is now old, but 'recent' continues it and is not
        await pruned.wait()  # an hour later
        assert [r.sessions for r in results] == [2, 0]
        clock.step(days=30)
        pruned = trio.Event()
        await pruned.wait()
        assert [r.sessions for r in results] == [2, 0, 2]
        # The conversation recorded meanwhile is untouched.
        sid = await store.start_session(backend="local", model="m", voice=None)
        await store.record(sid, [StoreToolCall("c1", "f1", None, 1, "get_time", "{}"),
                                 StoreToolResult("c1", "ok", "12:00", 0, 3.0)])
    assert counts(db)["sessions"] == 1 and counts(db)["tool_executions"] == 1


def test_prune_from_the_command_line(history, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r2d2voice.cli.main import main

    db, _, _ = history
    env_file = tmp_path / "empty.env"
    env_file.touch()

    def r2(*args: str, **env: str):
        return CliRunner().invoke(main, ["--env-file", str(env_file), *args], env=env)

    for args, message in ((["--older-than", "0d"], "--older-than: '0d' is too young"),
                          ([], "--older-than AGE (e.g. 30d) or R2D2_RETENTION_DAYS")):
        result = r2("prune", "--db", str(db), *args)
        assert result.exit_code == 2 and message in result.stderr
        assert result.stderr.count("\n") == 1
    result = r2("prune", "--db", str(tmp_path / "nope.db"), "--older-than", "1d")
    assert result.exit_code == 2 and "no such database" in result.stderr
    # The setting gives the default age (the history is a year old by the real clock).
    result = r2("prune", "--db", str(db), R2D2_RETENTION_DAYS="30")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pruned 4 sessions older than ")
    assert counts(db)["sessions"] == 0
    result = r2("export", "--db", str(db), "--role", "tool")
    assert result.exit_code == 0 and result.stdout == ""


async def test_privacy_mode_and_retention_through_a_replay(tmp_path: Path) -> None:
    """R2D2_STORE_TEXT=false end to end: the conversation happens and is counted, no word of
    it is stored; R2D2_RETENTION_DAYS: the run deletes an old conversation as it starts."""
    from support import SAMPLES, clean_env, cli

    db = tmp_path / "r2.db"
    with Store.open(db, now=SteppedClock(T0 - timedelta(days=31))) as s:
        old = s.write.start_session(backend="local", model="m", voice=None)
        s.write.upsert_message(old, role="user", item_id="u1", seq=1, text="long ago")
        s.write.end_session(old)
    r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--db",
                  str(db), "--out", str(tmp_path / "reply.wav"), cwd=tmp_path,
                  env=clean_env(HOME=str(tmp_path), R2D2_STORE_TEXT="false",
                                R2D2_RETENTION_DAYS="30"))
    assert r.returncode == 0, r.stderr.decode()
    assert "r2: *" in r.stdout.decode()  # the robot answered (in beeps)
    with Store.open(db, create=False) as s:
        ids = [x.id for x in s.read.list_sessions()]
        assert old not in ids and len(ids) == 1
        rows = list(s.read.iter_messages())
        assert len(rows) == 4 and {(m.text, m.text_kept) for m in rows} == {("", False)}
        assert s.conn.execute("SELECT count(*) FROM messages WHERE raw_event IS NOT NULL"
                              ).fetchone()[0] == 0
        assert s.read.response_status_counts() == {"completed": 2}
