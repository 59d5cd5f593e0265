"""The SQLite transcript store: files, schema and migrations, writes, reads, streaming plan."""

from __future__ import annotations

import gc
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from storage_support import T0, SteppedClock, at

from r2d2voice.errors import UsageError
from r2d2voice.storage.database import Store
from r2d2voice.storage.queries import MessageRow, ToolRow
from r2d2voice.storage.schema import APPLICATION_ID, SCHEMA_VERSION
from r2d2voice.storage.timestamps import format_ts, parse_ts


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "r2.db"


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
def store(db: Path, clock: SteppedClock):
    with Store.open(db, now=clock) as s:
        yield s


def new_session(store: Store, **kw) -> str:
    return store.write.start_session(backend="local", model="gpt-realtime", voice="ash", **kw)


def say(store: Store, sid: str, role: str, item: str, seq: int, text: str, **kw) -> None:
    store.write.upsert_message(sid, role=role, item_id=item, seq=seq, text=text, **kw)


def texts(store: Store, **kw) -> list[str]:
    return [m.text for m in store.read.iter_messages(**kw)]


# ---------------------------------------------------------------------------- files


def test_new_database_is_private_with_wal_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "state" / "r2d2voice" / "r2.db"
    parent_mode = mode(tmp_path)
    with Store.open(path) as s:
        sid = new_session(s)
        say(s, sid, "user", "i1", 1, "hello")
        assert mode(path) == 0o600
        for side in ("-wal", "-shm"):
            assert mode(Path(f"{path}{side}")) == 0o600
        assert mode(path.parent) == 0o700
        assert mode(path.parent.parent) == 0o700
        conn = s.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert mode(tmp_path) == parent_mode  # a directory we did not create is left alone


def test_missing_database_without_create_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "r2.db"
    with pytest.raises(UsageError) as e:
        Store.open(path, create=False)
    assert str(e.value) == f"no such database: {path}"
    assert e.value.exit_code == 2
    assert not path.parent.exists()


@pytest.mark.parametrize("create", [True, False])
def test_file_that_is_not_sqlite_is_refused_untouched(db: Path, create: bool) -> None:
    db.write_text("session_id,role\nabc,user\n")
    before = db.read_bytes()
    with pytest.raises(UsageError) as e:
        Store.open(db, create=create)
    assert str(e.value) == f"{db} is not an r2d2voice database"
    assert db.read_bytes() == before


@pytest.mark.parametrize("create", [True, False])
def test_foreign_sqlite_database_is_refused_untouched(db: Path, create: bool) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(UsageError, match="is not an r2d2voice database"):
        Store.open(db, create=create)
    assert db.read_bytes() == before  # not even switched to WAL
    assert sorted(os.listdir(db.parent)) == ["r2.db"]


def test_empty_file_is_initialised_with_create_but_refused_without(db: Path) -> None:
    db.touch()
    with pytest.raises(UsageError, match="is not an r2d2voice database"):
        Store.open(db, create=False)
    assert db.stat().st_size == 0
    with Store.open(db) as s:
        new_session(s)
    with Store.open(db, create=False) as r:
        assert len(r.read.list_sessions()) == 1


@pytest.mark.parametrize("create", [True, False])
def test_newer_schema_version_is_refused(db: Path, create: bool) -> None:
    Store.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UsageError) as e:
        Store.open(db, create=create)
    msg = str(e.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in msg
    assert "newer" in msg


_READ_ELSEWHERE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print([t for (t,) in conn.execute("SELECT text FROM messages ORDER BY id")])
conn.close()
"""


def read_elsewhere(db: Path) -> str:
    """What another process (an ``export``, a person's sqlite3) sees, opening and closing."""
    return subprocess.run([sys.executable, "-c", _READ_ELSEWHERE, str(db)], check=True,
                          capture_output=True, text=True).stdout


def test_more_connections_in_the_writers_process_keep_its_wal_safe(db: Path) -> None:
    """A run holds the recorder's connection and opens more (the memory tools, the session's
    instructions, the shipper). Opening one must not drop the process's file locks: another
    process closing its connection would then delete the WAL under the writer, and what the
    writer wrote next would be invisible (lost in a crash)."""
    with Store.open(db) as writer:
        sid = new_session(writer)
        say(writer, sid, "user", "u1", 1, "before")
        for create in (True, False):
            Store.open(db, create=create).close()
        assert read_elsewhere(db).strip() == "['before']"
        assert Path(f"{db}-wal").exists()
        say(writer, sid, "user", "u2", 2, "after")
        assert read_elsewhere(db).strip() == "['before', 'after']"


def test_readonly_open_sees_data_and_leaves_files_as_they_were(db: Path) -> None:
    with Store.open(db) as w:
        sid = new_session(w)
        say(w, sid, "user", "i1", 1, "kept")
    before = (sorted(os.listdir(db.parent)), db.read_bytes(), db.stat().st_mtime_ns)
    with Store.open(db, create=False) as r:
        assert texts(r) == ["kept"]
        with pytest.raises(RuntimeError, match="read-only"):
            say(r, sid, "user", "i2", 2, "nope")
    after = (sorted(os.listdir(db.parent)), db.read_bytes(), db.stat().st_mtime_ns)
    assert after == before


# ---------------------------------------------------------------------------- migrations

# What versions 1 and 2 have in common: sessions, and how a messages row begins.
_V1_V2_SESSIONS = """
CREATE TABLE sessions (
    id TEXT NOT NULL PRIMARY KEY, started_at TEXT NOT NULL, ended_at TEXT,
    backend TEXT NOT NULL, model TEXT NOT NULL, voice TEXT, service_session_id TEXT,
    previous_session_id TEXT REFERENCES sessions(id), metadata TEXT
);
CREATE UNIQUE INDEX sessions_by_start ON sessions(started_at, id);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL DEFAULT ''"""

V1_SCHEMA = f"""{_V1_V2_SESSIONS},
    created_at TEXT NOT NULL, item_id TEXT NOT NULL, response_id TEXT, raw_event TEXT,
    UNIQUE (session_id, item_id, role)
);
CREATE INDEX messages_by_time ON messages(session_id, created_at);
CREATE TABLE responses (
    session_id TEXT NOT NULL REFERENCES sessions(id), response_id TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, done_at TEXT,
    PRIMARY KEY (session_id, response_id)
);
CREATE TABLE errors (
    id INTEGER PRIMARY KEY, session_id TEXT REFERENCES sessions(id), at TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('service', 'local')), type TEXT, code TEXT,
    message TEXT NOT NULL
);
CREATE INDEX errors_by_session ON errors(session_id, at);
INSERT INTO sessions VALUES ('20261120T080000Z-aaaaaa', '2026-11-20T08:00:00.000Z',
    '2026-11-20T08:10:00.000Z', 'openai', 'gpt-realtime', 'ash', 'sess_123', NULL, '{{}}');
INSERT INTO messages (session_id, role, text, created_at, item_id, response_id, raw_event)
VALUES ('20261120T080000Z-aaaaaa', 'user', 'old question', '2026-11-20T08:00:01.000Z',
        'item_u1', NULL, '{{"type": "x"}}'),
       ('20261120T080000Z-aaaaaa', 'assistant', 'old answer', '2026-11-20T08:00:02.000Z',
        'item_a1', 'resp_1', NULL);
INSERT INTO responses VALUES ('20261120T080000Z-aaaaaa', 'resp_1', 'completed',
    '2026-11-20T08:00:01.500Z', '2026-11-20T08:00:03.000Z');
INSERT INTO errors (session_id, at, source, type, code, message) VALUES
    ('20261120T080000Z-aaaaaa', '2026-11-20T08:05:00.000Z', 'service', 'invalid_request_error',
     'bad', 'old error');
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 1;
"""
OLD = "20261120T080000Z-aaaaaa"

# Version 2 as it shipped, with rows written in an order different from their times.
V2_SCHEMA = f"""{_V1_V2_SESSIONS},
    created_at TEXT NOT NULL, item_id TEXT NOT NULL, response_id TEXT,
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)), played_ms INTEGER,
    raw_event TEXT, UNIQUE (session_id, item_id, role)
);
CREATE INDEX messages_by_time ON messages(session_id, created_at);
CREATE TABLE responses (
    session_id TEXT NOT NULL REFERENCES sessions(id), response_id TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, done_at TEXT,
    input_text_tokens INTEGER, input_audio_tokens INTEGER, input_cached_tokens INTEGER,
    output_text_tokens INTEGER, output_audio_tokens INTEGER, first_audio_ms INTEGER,
    first_played_ms INTEGER, PRIMARY KEY (session_id, response_id)
);
CREATE TABLE errors (
    id INTEGER PRIMARY KEY, session_id TEXT REFERENCES sessions(id), at TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('service', 'local')), type TEXT, code TEXT,
    message TEXT NOT NULL
);
CREATE INDEX errors_by_session ON errors(session_id, at);
INSERT INTO sessions (id, started_at, backend, model, voice) VALUES
    ('S2', '2026-11-20T09:00:00.000Z', 'openai', 'gpt-realtime', 'ash'),
    ('S1', '2026-11-20T08:00:00.000Z', 'openai', 'gpt-realtime', 'ash');
INSERT INTO messages (session_id, role, text, created_at, item_id, interrupted, played_ms)
VALUES ('S2', 'user', 's2 first', '2026-11-20T09:00:01.000Z', 'u1', 0, NULL),
       ('S1', 'assistant', 's1 second', '2026-11-20T08:00:05.000Z', 'a1', 1, 700),
       ('S1', 'user', 's1 first', '2026-11-20T08:00:01.000Z', 'u1', 0, NULL),
       ('S1', 'user', 's1 tie a', '2026-11-20T08:00:09.000Z', 'u2', 0, NULL),
       ('S1', 'assistant', 's1 tie b', '2026-11-20T08:00:09.000Z', 'a2', 0, NULL);
INSERT INTO responses (session_id, response_id, status, created_at, first_audio_ms) VALUES
    ('S1', 'r1', 'completed', '2026-11-20T08:00:04.000Z', 410);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 2;
"""

# Version 3 as it shipped: conversation order from sequence numbers, no tool audit yet.
V3_SCHEMA = f"""
CREATE TABLE sessions (
    id TEXT NOT NULL PRIMARY KEY, seq INTEGER NOT NULL, started_at TEXT NOT NULL,
    ended_at TEXT, backend TEXT NOT NULL, model TEXT NOT NULL, voice TEXT,
    service_session_id TEXT, previous_session_id TEXT REFERENCES sessions(id), metadata TEXT
);
CREATE UNIQUE INDEX sessions_by_seq ON sessions(seq);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL, item_id TEXT NOT NULL,
    response_id TEXT, interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    played_ms INTEGER, raw_event TEXT, UNIQUE (session_id, item_id, role)
);
CREATE INDEX messages_by_seq ON messages(session_id, seq);
CREATE TABLE responses (
    session_id TEXT NOT NULL REFERENCES sessions(id), response_id TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, done_at TEXT,
    input_text_tokens INTEGER, input_audio_tokens INTEGER, input_cached_tokens INTEGER,
    output_text_tokens INTEGER, output_audio_tokens INTEGER, first_audio_ms INTEGER,
    first_played_ms INTEGER, status_details TEXT, PRIMARY KEY (session_id, response_id)
);
CREATE TABLE errors (
    id INTEGER PRIMARY KEY, session_id TEXT REFERENCES sessions(id), at TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('service', 'local')), type TEXT, code TEXT,
    message TEXT NOT NULL
);
CREATE INDEX errors_by_session ON errors(session_id, at);
INSERT INTO sessions (id, seq, started_at, backend, model, voice) VALUES
    ('S1', 1, '2026-11-20T08:00:00.000Z', 'openai', 'gpt-realtime', 'ash');
INSERT INTO messages (session_id, seq, role, text, created_at, item_id, raw_event) VALUES
    ('S1', 1, 'user', 'v3 question', '2026-11-20T08:00:01.000Z', 'u1', '{{"e": 1}}'),
    ('S1', 3, 'assistant', 'v3 answer', '2026-11-20T08:00:02.000Z', 'a1', NULL);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 3;
"""


def build(path: Path, script: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.close()


def shape(conn: sqlite3.Connection) -> dict[str, object]:
    """Tables (column name, type, not null, pk) and indexes (unique, columns) of a database."""
    out: dict[str, object] = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        cols = conn.execute(f"PRAGMA table_info({table})").fetchall()
        out[table] = sorted((c[1], c[2], c[3], c[5]) for c in cols)
        for idx in conn.execute(f"PRAGMA index_list({table})").fetchall():
            info = conn.execute(f"PRAGMA index_info({idx[1]})").fetchall()
            name = idx[1] if not idx[1].startswith("sqlite_autoindex") else f"auto {table}"
            out[f"index {name}"] = (idx[2], [c[2] for c in info])
    return out


def test_v1_database_is_migrated_and_old_rows_survive(db: Path) -> None:
    build(db, V1_SCHEMA)
    with Store.open(db) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert list(s.read.iter_messages()) == [
            MessageRow(OLD, 1, "user", "old question", "2026-11-20T08:00:01.000Z", "item_u1",
                       None, False, None),
            MessageRow(OLD, 2, "assistant", "old answer", "2026-11-20T08:00:02.000Z", "item_a1",
                       "resp_1", False, None),
        ]  # fmt: skip
        [sess] = s.read.list_sessions()
        assert (sess.id, sess.seq, sess.ended_at, sess.service_session_id, sess.turns) == (
            OLD, 1, "2026-11-20T08:10:00.000Z", "sess_123", 1
        )
        assert [e.message for e in s.read.list_errors()] == ["old error"]
        # The new columns work on old rows.
        s.write.mark_interrupted(OLD, item_id="item_a1", seq=2, played_ms=1200)
        usage = {"input_token_details": {"text_tokens": 5, "audio_tokens": 7, "cached_tokens": 2},
                 "output_token_details": {"text_tokens": 3, "audio_tokens": 11}}  # fmt: skip
        s.write.record_response(OLD, response_id="resp_1", status="completed", usage=usage)
        [u] = s.read.usage_totals()
        assert (u.responses, u.input_text, u.input_audio, u.output_audio) == (1, 5, 7, 11)
        [row] = s.read.iter_messages(role="assistant")
        assert (row.text, row.interrupted, row.played_ms) == ("old answer", True, 1200)
    with Store.open(db, create=False) as r:  # and it stays migrated
        assert len(list(r.read.iter_messages())) == 2


def test_v2_database_keeps_its_order_as_sequence_numbers(db: Path, clock: SteppedClock) -> None:
    build(db, V2_SCHEMA)
    clock.set(datetime(2026, 11, 19, tzinfo=timezone.utc))  # a clock stepped back at boot
    with Store.open(db, now=clock) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = list(s.read.iter_messages())
        # v2's order (sessions by start, messages by time then rowid) is now the seq order
        assert [(m.session_id, m.seq, m.text) for m in rows] == [
            ("S1", 1, "s1 first"), ("S1", 2, "s1 second"), ("S1", 3, "s1 tie a"),
            ("S1", 4, "s1 tie b"), ("S2", 1, "s2 first"),
        ]  # fmt: skip
        assert (rows[1].interrupted, rows[1].played_ms) == (True, 700)
        assert [(r.id, r.seq) for r in s.read.list_sessions()] == [("S1", 1), ("S2", 2)]
        assert s.read.response_latencies() == ([410], [])
        # New rows go last, whatever the wall clock says.
        new = new_session(s)
        say(s, new, "user", "u1", 1, "after the migration")
        assert [r.id for r in s.read.list_sessions()] == ["S1", "S2", new]
        assert texts(s)[-1] == "after the migration"
        s.write.record_response("S1", response_id="r1", status="failed",
                                status_details={"type": "failed", "error": {"code": "x"}})
        details = s.conn.execute("SELECT status_details FROM responses").fetchone()[0]
        assert details == '{"type": "failed", "error": {"code": "x"}}'


def test_v3_database_gains_the_tool_audit_and_keeps_its_rows(db: Path,
                                                             clock: SteppedClock) -> None:
    build(db, V3_SCHEMA)
    with Store.open(db, now=clock) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # Old files keep auto_vacuum NONE until `prune` converts them (one VACUUM).
        assert s.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        rows = list(s.read.iter_messages())
        assert [(m.seq, m.text, m.text_kept) for m in rows] == [
            (1, "v3 question", True), (3, "v3 answer", True)]
        s.write.record_tool_call("S1", call_id="c1", item_id="fc1", response_id="r1", seq=2,
                                 name="get_time", arguments="{}")
        assert [(r.role, r.seq) for r in s.read.iter_conversation()] == [
            ("user", 1), ("tool", 2), ("assistant", 3)]


def test_migrated_database_has_the_shape_of_a_new_one(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.db" for name in ("fresh", "v1", "v2", "v3")]
    for path, script in zip(paths[1:], (V1_SCHEMA, V2_SCHEMA, V3_SCHEMA), strict=True):
        build(path, script)
    shapes = []
    for path in paths:
        with Store.open(path) as s:
            shapes.append(shape(s.conn))
    assert shapes[0] == shapes[1] == shapes[2] == shapes[3]
    assert shapes[0]["index sessions_by_seq"] == (1, ["seq"])
    assert shapes[0]["index messages_by_seq"] == (0, ["session_id", "seq"])
    assert shapes[0]["index tool_executions_by_seq"] == (0, ["session_id", "seq"])


@pytest.mark.parametrize("script", [V1_SCHEMA, V2_SCHEMA, V3_SCHEMA], ids=["v1", "v2", "v3"])
def test_old_database_opened_readonly_is_not_modified(db: Path, script: str) -> None:
    build(db, script)
    before = db.read_bytes()
    with pytest.raises(UsageError, match=r"schema version [123]\b.*upgrade"):
        Store.open(db, create=False)
    assert db.read_bytes() == before


# ---------------------------------------------------------------------------- streaming plan


@pytest.mark.parametrize("source", ["fresh", "v2"])
def test_export_query_streams_in_order_with_no_sort(db: Path, source: str) -> None:
    """Every filter combination walks the indexes in order: no temp B-tree, which would make
    the first row wait for (and memory grow with) the whole selection. Messages and tool
    executions are two such cursors, merged as they stream."""
    if source == "v2":
        build(db, V2_SCHEMA)
    with Store.open(db) as s:
        sid = s.read.list_sessions()[0].id if source == "v2" else new_session(s)
        s.write.record_tool_call(sid, call_id="c1", item_id="fc1", response_id=None, seq=9,
                                 name="get_time", arguments="{}")
        seen: list[str] = []
        s.conn.set_trace_callback(seen.append)
        cases = [{}, {"sessions": [sid]}, {"role": "user"}, {"role": "tool"},
                 {"since": at(0), "until": at(60), "role": "assistant", "sessions": [sid]},
                 {"since": at(0), "until": at(60), "sessions": [sid]}]
        for kw in cases:
            list(s.read.iter_conversation(**kw))
        s.read.recent_turns([sid], 5)
        s.conn.set_trace_callback(None)
        selects = [sql for sql in seen if "EXISTS" not in sql]
        merged = 3  # the cases without a role read two cursors
        assert len(selects) == len(cases) + merged + 1  # + recent_turns
        for sql in selects:
            plan = " | ".join(r[3] for r in s.conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "TEMP B-TREE" not in plan, plan
            table_index = "tool_executions_by_seq" if "tool_executions" in sql \
                else "messages_by_seq"
            assert "sessions_by_seq" in plan and table_index in plan, plan


# ---------------------------------------------------------------------------- writes


def test_same_item_written_twice_updates_one_row(store: Store, clock: SteppedClock) -> None:
    sid = new_session(store)
    clock.set(at(1))
    say(store, sid, "assistant", "it", 3, "Hel", raw_event='{"n": 1}')
    clock.set(at(5))
    say(store, sid, "assistant", "it", 3, "Hello there", response_id="resp_9",
        raw_event='{"n": 2}')
    assert list(store.read.iter_messages()) == [
        MessageRow(sid, 3, "assistant", "Hello there", format_ts(at(1)), "it", "resp_9", False,
                   None)
    ]  # fmt: skip
    raw = store.conn.execute("SELECT raw_event FROM messages").fetchall()
    assert raw == [('{"n": 2}',)]
    # The same item id in another session, or with the other role, is another message.
    other = new_session(store)
    say(store, other, "assistant", "it", 1, "again")
    say(store, sid, "user", "it", 1, "user side")
    assert len(list(store.read.iter_messages())) == 3


def test_interruption_recorded_before_the_transcript_survives_it(
    store: Store, clock: SteppedClock
) -> None:
    sid = new_session(store)
    clock.set(at(2))
    store.write.mark_interrupted(sid, item_id="item_a", seq=2, played_ms=1234)
    [row] = store.read.iter_messages()
    assert (row.role, row.text, row.interrupted, row.played_ms) == ("assistant", "", True, 1234)
    clock.set(at(4))
    say(store, sid, "assistant", "item_a", 2, "I was say", response_id="resp_1")
    [row] = store.read.iter_messages()
    assert (row.text, row.interrupted, row.played_ms, row.created_at, row.seq) == (
        "I was say", True, 1234, format_ts(at(2)), 2
    )
    # And the other way round: transcript first, interruption later keeps the text.
    say(store, sid, "assistant", "item_b", 4, "Long answer")
    store.write.mark_interrupted(sid, item_id="item_b", seq=4, played_ms=800)
    row = next(m for m in store.read.iter_messages() if m.item_id == "item_b")
    assert (row.text, row.interrupted, row.played_ms) == ("Long answer", True, 800)
    # recent_turns skips the empty placeholder texts but not interrupted ones with text.
    store.write.mark_interrupted(sid, item_id="item_c", seq=6, played_ms=10)
    assert [t for _, t in store.read.recent_turns([sid], 10)] == ["I was say", "Long answer"]


def test_tool_execution_rows_from_call_to_result(store: Store, clock: SteppedClock) -> None:
    sid = new_session(store)
    say(store, sid, "user", "u1", 1, "look left")
    clock.set(at(3))
    store.write.record_tool_call(sid, call_id="call_1", item_id="fc_1", response_id="r1",
                                 seq=2, name="turn_head", arguments='{"degrees": -90}')
    [running] = store.read.iter_tools()
    assert (running.status, running.started_at, running.output, running.role) == (
        "running", format_ts(at(3)), None, "tool")
    clock.set(at(4))
    store.write.record_tool_result(sid, call_id="call_1", status="ok",
                                   output="turned to -90", exit_code=0, duration_ms=41.4)
    # The same call again (a replayed event) updates it and keeps its place and time.
    store.write.record_tool_call(sid, call_id="call_1", item_id="fc_1", response_id=None,
                                 seq=7, name="turn_head", arguments='{"degrees": -90}')
    say(store, sid, "assistant", "a1", 3, "Done.")
    assert list(store.read.iter_tools()) == [ToolRow(
        sid, 2, format_ts(at(3)), "fc_1", "r1", "call_1", "turn_head", '{"degrees": -90}',
        "turned to -90", "ok", 0, 41)]
    assert [(r.role, r.seq) for r in store.read.iter_conversation()] == [
        ("user", 1), ("tool", 2), ("assistant", 3)]
    # A result that arrives after a reconnect, under the next session's id, finds its call.
    store.write.record_tool_call(sid, call_id="call_2", item_id="fc_2", response_id="r2",
                                 seq=4, name="r2-slow", arguments="{}")
    later = new_session(store, previous_session_id=sid)
    store.write.record_tool_result(later, call_id="call_2", status="timeout",
                                   output="timed out after 5 s", duration_ms=5003)
    store.write.record_tool_result(later, call_id="never-called", status="error")
    store.write.record_tool_call(later, call_id="call_3", item_id="fc_3", response_id="r3",
                                 seq=1, name="nope", arguments="{oops")
    store.write.record_tool_result(later, call_id="call_3", status="rejected",
                                   output="unknown tool: nope")
    assert [(r.session_id, r.call_id, r.status, r.exit_code) for r in store.read.iter_tools()] \
        == [(sid, "call_1", "ok", 0), (sid, "call_2", "timeout", None),
            (later, "call_3", "rejected", None)]
    assert store.read.tool_counts() == {"nope": {"rejected": 1}, "r2-slow": {"timeout": 1},
                                        "turn_head": {"ok": 1}}
    assert store.read.tool_counts(sessions=[later]) == {"nope": {"rejected": 1}}
    with pytest.raises(ValueError, match="status"):
        store.write.record_tool_result(sid, call_id="call_1", status="fine")


def test_privacy_mode_keeps_everything_but_the_words(db: Path, clock: SteppedClock) -> None:
    usage = {"input_token_details": {"text_tokens": 5, "audio_tokens": 7, "cached_tokens": 0},
             "output_token_details": {"text_tokens": 3, "audio_tokens": 11}}
    with Store.open(db, now=clock, store_text=False) as s:
        sid = new_session(s)
        say(s, sid, "user", "u1", 1, "my PIN is zebra", raw_event='{"transcript": "zebra"}')
        s.write.mark_interrupted(sid, item_id="a1", seq=2, played_ms=500)
        say(s, sid, "assistant", "a1", 2, "I will remember zebra", response_id="r1")
        s.write.record_response(sid, response_id="r1", status="completed", usage=usage,
                                first_audio_ms=300)
        s.write.record_tool_call(sid, call_id="c1", item_id="fc1", response_id="r1", seq=3,
                                 name="remember", arguments='{"note": "PIN zebra"}')
        s.write.record_tool_result(sid, call_id="c1", status="error", output="saved zebra",
                                   exit_code=2, duration_ms=12)
        dump = "\n".join(s.conn.iterdump())
        assert "zebra" not in dump
        rows = list(s.read.iter_messages())
        assert [(m.role, m.text, m.text_kept, m.interrupted) for m in rows] == [
            ("user", "", False, False), ("assistant", "", False, True)]
        [tool] = s.read.iter_tools()
        assert (tool.name, tool.arguments, tool.output, tool.status, tool.exit_code,
                tool.duration_ms, tool.text_kept) == ("remember", None, None, "error", 2, 12,
                                                      False)
        assert s.read.usage_totals()[0].output_audio == 11
        assert s.read.response_latencies() == ([300], [])
        assert s.read.recent_turns([sid], 10) == []  # no words, no context to re-send
    with Store.open(db, now=clock) as s:  # text kept again: a later write keeps it
        say(s, sid, "user", "u1", 1, "hello again")
        assert [(m.text, m.text_kept) for m in s.read.iter_messages(role="user")] == [
            ("hello again", True)]


def test_each_write_is_visible_to_another_reader_at_once(db: Path, store: Store) -> None:
    sid = new_session(store)
    with Store.open(db, create=False) as reader:
        assert [s.id for s in reader.read.list_sessions()] == [sid]
        say(store, sid, "user", "i1", 1, "one")
        assert texts(reader) == ["one"]


def test_batch_commits_once_at_the_end(db: Path, store: Store) -> None:
    sid = new_session(store)
    with Store.open(db, create=False) as reader:
        with store.write.batch():
            for i in range(3):
                say(store, sid, "user", f"i{i}", i + 1, f"t{i}")
            store.write.record_response(sid, response_id="r1", status="completed")
            assert texts(reader) == []  # nothing committed yet
        assert texts(reader) == ["t0", "t1", "t2"]


def test_failed_batch_rolls_back_as_a_whole(store: Store) -> None:
    sid = new_session(store)
    with pytest.raises(sqlite3.IntegrityError), store.write.batch():
        say(store, sid, "user", "i1", 1, "lost")
        say(store, "no-such-session", "user", "i2", 2, "bad")
    assert texts(store) == []
    say(store, sid, "user", "i3", 3, "later")  # store still usable
    assert texts(store) == ["later"]


def test_concurrent_reader_sees_committed_rows_without_lock_errors(db: Path) -> None:
    total = 400
    writer = Store.open(db)
    sid = new_session(writer)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(total):
                if i % 50 == 0:
                    with writer.write.batch():
                        for j in range(10):
                            say(writer, sid, "assistant", f"b{i}-{j}", 10_000 + i * 10 + j,
                                "batched")
                say(writer, sid, "user", f"i{i}", i, f"msg {i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    counts = []
    with Store.open(db, create=False) as reader:
        thread.start()
        while thread.is_alive():
            counts.append(sum(1 for _ in reader.read.iter_messages()))
            reader.read.list_sessions()
        thread.join()
        counts.append(sum(1 for _ in reader.read.iter_messages()))
    writer.close()
    assert errors == []
    assert counts == sorted(counts)  # committed rows never disappear
    assert counts[-1] == total + 10 * (total // 50)
    assert any(0 < c < counts[-1] for c in counts)  # some reads really overlapped the writes


def test_responses_stamps_usage_latency_and_totals(store: Store, clock: SteppedClock) -> None:
    a = new_session(store)
    b = new_session(store)
    clock.set(at(1))
    store.write.record_response(a, response_id="r1", status="in_progress")
    usage = {
        "total_tokens": 60, "input_tokens": 40, "output_tokens": 20,
        "input_token_details": {"text_tokens": 10, "audio_tokens": 30, "cached_tokens": 8},
        "output_token_details": {"text_tokens": 5, "audio_tokens": 15},
    }  # fmt: skip
    clock.set(at(3))
    store.write.record_response(a, response_id="r1", status="completed", usage=usage,
                                first_audio_ms=419.6)
    clock.set(at(9))  # a repeated final status keeps the first done_at
    store.write.record_response(a, response_id="r1", status="completed")
    store.write.record_response(a, response_id="r2", status="cancelled", usage=usage)
    store.write.set_response_latency(a, response_id="r2", first_audio_ms=420)
    store.write.set_response_latency(a, response_id="r2", first_played_ms=510)
    row = store.conn.execute(
        "SELECT status, created_at, done_at, first_audio_ms, first_played_ms,"
        " input_text_tokens FROM responses WHERE response_id = 'r1'"
    ).fetchone()
    assert row == ("completed", format_ts(at(1)), format_ts(at(3)), 420, None, 10)
    lat = store.conn.execute(
        "SELECT first_audio_ms, first_played_ms, done_at FROM responses"
        " WHERE response_id = 'r2'"
    ).fetchone()
    assert lat == (420, 510, format_ts(at(9)))
    totals = {u.session_id: u for u in store.read.usage_totals()}
    assert (totals[a].responses, totals[a].input_text, totals[a].input_audio) == (2, 20, 60)
    assert (totals[a].input_cached, totals[a].output_text, totals[a].output_audio) == (16, 10, 30)
    assert (totals[a].input_total, totals[a].output_total) == (80, 40)
    assert (totals[b].responses, totals[b].output_total) == (0, 0)
    assert [u.session_id for u in store.read.usage_totals([b])] == [b]


def test_errors_are_recorded_in_the_order_they_happened(
    store: Store, clock: SteppedClock
) -> None:
    sid = new_session(store)
    clock.set(at(100))
    store.write.record_error(sid, source="service", type="invalid_request_error",
                             code="bad_voice", message="Invalid voice")
    clock.set(at(1))  # the clock was stepped back
    store.write.record_error(None, source="local", type="connection", code=None, message="reset")
    assert [(e.session_id, e.source, e.code, e.message, e.at)
            for e in store.read.list_errors()] == [
        (sid, "service", "bad_voice", "Invalid voice", format_ts(at(100))),
        (None, "local", None, "reset", format_ts(at(1))),
    ]  # fmt: skip
    assert len(store.read.list_errors(sid)) == 1
    with pytest.raises(ValueError):
        store.write.record_error(sid, source="elsewhere", type=None, code=None, message="x")


# ---------------------------------------------------------------------------- reads


def test_sessions_ids_order_and_counts(store: Store, clock: SteppedClock) -> None:
    clock.set(at(3600))
    first = new_session(store, metadata={"host": "kitchen"})
    clock.set(at(0))  # stepped back an hour: the next session still comes after
    second = new_session(store)
    cont = new_session(store, previous_session_id=second)
    assert re.fullmatch(r"20251121T093000Z-[0-9a-f]{6}", second)
    store.write.set_service_session_id(second, service_session_id="sess_abc")
    clock.set(at(30))
    store.write.end_session(second)
    say(store, second, "user", "u1", 1, "hi")
    say(store, second, "assistant", "a1", 2, "beep")
    say(store, second, "user", "u2", 3, "again")
    rows = store.read.list_sessions()
    assert [(r.id, r.seq) for r in rows] == [(first, 1), (second, 2), (cont, 3)]
    assert rows[0].started_at == format_ts(at(3600)) > rows[1].started_at  # labels only
    mid = rows[1]
    assert (mid.turns, mid.messages, mid.service_session_id) == (2, 3, "sess_abc")
    assert mid.ended_at == format_ts(at(30))
    assert rows[2].ended_at is None
    assert rows[2].previous_session_id == second
    assert store.read.get_session(cont) == rows[2]
    assert store.read.get_session("missing") is None
    meta = store.conn.execute("SELECT metadata FROM sessions WHERE id = ?", (first,)).fetchone()
    assert meta == ('{"host": "kitchen"}',)


def test_iter_messages_order_and_filters(store: Store, clock: SteppedClock) -> None:
    a = new_session(store)
    b = new_session(store)
    # Written out of order, with labels that disagree with the order; equal seq keeps
    # insertion order.
    clock.set(at(601))
    say(store, b, "user", "b1", 1, "b-first")
    clock.set(at(5))
    say(store, a, "assistant", "a2", 2, "a-second")
    clock.set(at(700))
    say(store, a, "user", "a1", 1, "a-first")
    clock.set(at(9))
    say(store, a, "user", "a3", 3, "a-tie-1")
    say(store, a, "assistant", "a4", 3, "a-tie-2")
    assert texts(store) == ["a-first", "a-second", "a-tie-1", "a-tie-2", "b-first"]
    assert [m.seq for m in store.read.iter_messages()] == [1, 2, 3, 3, 1]
    assert texts(store, sessions=[b]) == ["b-first"]
    assert texts(store, role="assistant") == ["a-second", "a-tie-2"]
    # time filters select by label, and keep conversation order
    assert texts(store, since=at(5), until=at(601)) == ["a-second", "a-tie-1", "a-tie-2"]
    assert texts(store, since=at(601)) == ["a-first", "b-first"]
    with pytest.raises(ValueError):
        list(store.read.iter_messages(role="system"))


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What finalizers failed with ("Exception ignored in ..."), instead of stderr."""
    seen: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda u: seen.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    return seen


@pytest.mark.parametrize("reader", ["iter_messages", "iter_tools", "iter_conversation"])
def test_a_reader_left_half_read_is_closed_with_its_store(db: Path, unraisable: list[str],
                                                          reader: str) -> None:
    """A reader that stops early (``export | head``) and never closes its iterator: closing
    the store closes the iterator's cursors first, so nothing later touches a closed
    database."""
    with Store.open(db) as s:
        sid = new_session(s)
        for seq in (1, 3):
            say(s, sid, "user", f"u{seq}", seq, "hi")
            s.write.record_tool_call(sid, call_id=f"c{seq}", item_id=f"fc{seq}",
                                     response_id=None, seq=seq + 1, name="get_time",
                                     arguments="{}")
    store = Store.open(db, create=False)
    rows = getattr(store.read, reader)()
    next(rows)
    store.close()
    del rows
    gc.collect()
    assert unraisable == []
    # Read to the end or closed by its reader, a stream leaves nothing for the store.
    with Store.open(db, create=False) as again:
        assert len(list(getattr(again.read, reader)())) in (2, 4)
        closed = getattr(again.read, reader)()
        next(closed)
        closed.close()
    gc.collect()
    assert unraisable == []


def test_recent_turns_are_the_last_ones_in_conversation_order(
    store: Store, clock: SteppedClock
) -> None:
    a = new_session(store)
    b = new_session(store, previous_session_id=a)
    clock.set(at(101))
    say(store, b, "user", "b1", 1, "b1")
    clock.step(days=3)
    say(store, a, "user", "a1", 1, "a1")
    clock.step(hours=-1)
    say(store, a, "assistant", "a2", 2, "a2")
    say(store, a, "user", "a3", 3, "")
    clock.set(at(0))
    say(store, b, "assistant", "b2", 2, "b2")
    assert store.read.recent_turns(None, 3) == [
        ("assistant", "a2"), ("user", "b1"), ("assistant", "b2")
    ]  # fmt: skip
    assert store.read.recent_turns([a, b], 10) == [
        ("user", "a1"), ("assistant", "a2"), ("user", "b1"), ("assistant", "b2")
    ]  # fmt: skip
    assert store.read.recent_turns([a], 1) == [("assistant", "a2")]
    assert store.read.recent_turns(None, 0) == []


def test_time_format() -> None:
    assert format_ts(datetime(2026, 11, 21, 9, 30, 0, 123999)) == "2026-11-21T09:30:00.123Z"
    cet = timezone(timedelta(hours=1))
    assert format_ts(datetime(2026, 11, 21, 10, 30, tzinfo=cet)) == "2026-11-21T09:30:00.000Z"
    assert parse_ts("2026-11-21T09:30:00.123Z") == datetime(
        2026, 11, 21, 9, 30, 0, 123000, tzinfo=timezone.utc
    )
    assert parse_ts(format_ts(T0)) == T0
