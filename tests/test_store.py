"""The SQLite transcript store: schema, migrations, durability rules, concurrent reads."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from r2d2voice.errors import UsageError
from r2d2voice.storage.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    MessageRow,
    Store,
    format_ts,
    parse_ts,
)

T0 = datetime(2025, 11, 21, 9, 30, 0, tzinfo=timezone.utc)  # before any "now"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "r2.db"


@pytest.fixture
def store(db: Path):
    with Store.open(db) as s:
        yield s


def new_session(store: Store, seconds: float = 0, **kw) -> str:
    return store.start_session(
        backend="local", model="gpt-realtime", voice="ash", started_at=at(seconds), **kw
    )


# ---------------------------------------------------------------------------- files


def test_new_database_is_private_with_wal_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "state" / "r2d2voice" / "r2.db"
    parent_mode = mode(tmp_path)
    with Store.open(path) as s:
        sid = new_session(s)
        s.upsert_message(sid, role="user", item_id="i1", text="hello")
        assert mode(path) == 0o600
        for side in ("-wal", "-shm"):
            assert mode(Path(f"{path}{side}")) == 0o600
        assert mode(path.parent) == 0o700
        assert mode(path.parent.parent) == 0o700
        conn = s.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
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
        assert len(r.list_sessions()) == 1


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


def test_readonly_open_sees_data_and_leaves_files_as_they_were(db: Path) -> None:
    with Store.open(db) as w:
        sid = new_session(w)
        w.upsert_message(sid, role="user", item_id="i1", text="kept")
    before = (sorted(os.listdir(db.parent)), db.read_bytes(), db.stat().st_mtime_ns)
    with Store.open(db, create=False) as r:
        assert [m.text for m in r.iter_messages()] == ["kept"]
        with pytest.raises(RuntimeError, match="read-only"):
            r.upsert_message(sid, role="user", item_id="i2", text="nope")
    after = (sorted(os.listdir(db.parent)), db.read_bytes(), db.stat().st_mtime_ns)
    assert after == before


# ---------------------------------------------------------------------------- migrations

V1_SCHEMA = f"""
CREATE TABLE sessions (
    id TEXT NOT NULL PRIMARY KEY, started_at TEXT NOT NULL, ended_at TEXT,
    backend TEXT NOT NULL, model TEXT NOT NULL, voice TEXT, service_session_id TEXT,
    previous_session_id TEXT REFERENCES sessions(id), metadata TEXT
);
CREATE UNIQUE INDEX sessions_by_start ON sessions(started_at, id);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL DEFAULT '',
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


def build_v1(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()


def test_v1_database_is_migrated_and_old_rows_survive(db: Path) -> None:
    build_v1(db)
    with Store.open(db) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert list(s.iter_messages()) == [
            MessageRow(OLD, "user", "old question", "2026-11-20T08:00:01.000Z", "item_u1",
                       None, False, None),
            MessageRow(OLD, "assistant", "old answer", "2026-11-20T08:00:02.000Z", "item_a1",
                       "resp_1", False, None),
        ]  # fmt: skip
        [sess] = s.list_sessions()
        assert (sess.id, sess.ended_at, sess.service_session_id, sess.turns) == (
            OLD, "2026-11-20T08:10:00.000Z", "sess_123", 1
        )
        assert [e.message for e in s.list_errors()] == ["old error"]
        # The new columns work on old rows.
        s.mark_interrupted(OLD, "item_a1", 1200)
        usage = {"input_token_details": {"text_tokens": 5, "audio_tokens": 7, "cached_tokens": 2},
                 "output_token_details": {"text_tokens": 3, "audio_tokens": 11}}  # fmt: skip
        s.record_response(OLD, "resp_1", status="completed", usage=usage)
        [u] = s.usage_totals()
        assert (u.responses, u.input_text, u.input_audio, u.output_audio) == (1, 5, 7, 11)
        [row] = s.iter_messages(role="assistant")
        assert (row.text, row.interrupted, row.played_ms) == ("old answer", True, 1200)
    with Store.open(db, create=False) as r:  # and it stays migrated
        assert len(list(r.iter_messages())) == 2


def test_v1_database_opened_readonly_is_not_modified(db: Path) -> None:
    build_v1(db)
    before = db.read_bytes()
    with pytest.raises(UsageError, match=r"schema version 1\b.*upgrade"):
        Store.open(db, create=False)
    assert db.read_bytes() == before


# ---------------------------------------------------------------------------- writes


def test_same_item_written_twice_updates_one_row(store: Store) -> None:
    sid = new_session(store)
    store.upsert_message(sid, role="assistant", item_id="it", text="Hel", created_at=at(1),
                         raw_event='{"n": 1}')  # fmt: skip
    store.upsert_message(sid, role="assistant", item_id="it", text="Hello there",
                         response_id="resp_9", created_at=at(5), raw_event='{"n": 2}')  # fmt: skip
    rows = list(store.iter_messages())
    assert rows == [
        MessageRow(sid, "assistant", "Hello there", format_ts(at(1)), "it", "resp_9", False, None)
    ]
    raw = store.conn.execute("SELECT raw_event FROM messages").fetchall()
    assert raw == [('{"n": 2}',)]
    # The same item id in another session, or with the other role, is another message.
    other = new_session(store, 60)
    store.upsert_message(other, role="assistant", item_id="it", text="again")
    store.upsert_message(sid, role="user", item_id="it", text="user side")
    assert len(list(store.iter_messages())) == 3


def test_interruption_recorded_before_the_transcript_survives_it(store: Store) -> None:
    sid = new_session(store)
    store.mark_interrupted(sid, "item_a", 1234, created_at=at(2))
    [row] = store.iter_messages()
    assert (row.role, row.text, row.interrupted, row.played_ms) == ("assistant", "", True, 1234)
    store.upsert_message(sid, role="assistant", item_id="item_a", text="I was say",
                         response_id="resp_1", created_at=at(4))  # fmt: skip
    [row] = store.iter_messages()
    assert (row.text, row.interrupted, row.played_ms, row.created_at) == (
        "I was say", True, 1234, format_ts(at(2))
    )
    # And the other way round: transcript first, interruption later keeps the text.
    store.upsert_message(sid, role="assistant", item_id="item_b", text="Long answer")
    store.mark_interrupted(sid, "item_b", 800)
    row = next(m for m in store.iter_messages() if m.item_id == "item_b")
    assert (row.text, row.interrupted, row.played_ms) == ("Long answer", True, 800)
    # recent_turns skips the empty placeholder texts but not interrupted ones with text.
    store.mark_interrupted(sid, "item_c", 10)
    assert [t for _, t in store.recent_turns([sid], 10)] == ["I was say", "Long answer"]


def test_each_write_is_visible_to_another_reader_at_once(db: Path, store: Store) -> None:
    sid = new_session(store)
    with Store.open(db, create=False) as reader:
        assert [s.id for s in reader.list_sessions()] == [sid]
        store.upsert_message(sid, role="user", item_id="i1", text="one")
        assert [m.text for m in reader.iter_messages()] == ["one"]


def test_batch_commits_once_at_the_end(db: Path, store: Store) -> None:
    sid = new_session(store)
    with Store.open(db, create=False) as reader:
        with store.batch():
            for i in range(3):
                store.upsert_message(sid, role="user", item_id=f"i{i}", text=f"t{i}")
            store.record_response(sid, "r1", status="completed")
            assert list(reader.iter_messages()) == []  # nothing committed yet
        assert [m.text for m in reader.iter_messages()] == ["t0", "t1", "t2"]


def test_failed_batch_rolls_back_as_a_whole(store: Store) -> None:
    sid = new_session(store)
    with pytest.raises(sqlite3.IntegrityError), store.batch():
        store.upsert_message(sid, role="user", item_id="i1", text="lost")
        store.upsert_message("no-such-session", role="user", item_id="i2", text="bad")
    assert list(store.iter_messages()) == []
    store.upsert_message(sid, role="user", item_id="i3", text="later")  # store still usable
    assert [m.text for m in store.iter_messages()] == ["later"]


def test_concurrent_reader_sees_committed_rows_without_lock_errors(db: Path) -> None:
    total = 400
    writer = Store.open(db)
    sid = new_session(writer)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(total):
                if i % 50 == 0:
                    with writer.batch():
                        for j in range(10):
                            writer.upsert_message(sid, role="assistant", item_id=f"b{i}-{j}",
                                                  text="batched")  # fmt: skip
                writer.upsert_message(sid, role="user", item_id=f"i{i}", text=f"msg {i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    counts = []
    with Store.open(db, create=False) as reader:
        thread.start()
        while thread.is_alive():
            counts.append(sum(1 for _ in reader.iter_messages()))
            reader.list_sessions()
        thread.join()
        counts.append(sum(1 for _ in reader.iter_messages()))
    writer.close()
    assert errors == []
    assert counts == sorted(counts)  # committed rows never disappear
    assert counts[-1] == total + 10 * (total // 50)
    assert any(0 < c < counts[-1] for c in counts)  # some reads really overlapped the writes


def test_responses_usage_and_totals(store: Store) -> None:
    a = new_session(store)
    b = new_session(store, 100)
    store.record_response(a, "r1", status="in_progress", created_at=at(1))
    usage = {
        "total_tokens": 60, "input_tokens": 40, "output_tokens": 20,
        "input_token_details": {"text_tokens": 10, "audio_tokens": 30, "cached_tokens": 8},
        "output_token_details": {"text_tokens": 5, "audio_tokens": 15},
    }  # fmt: skip
    store.record_response(a, "r1", status="completed", usage=usage, done_at=at(3))
    store.record_response(a, "r2", status="cancelled", usage=usage)
    store.set_response_latency(a, "r2", first_audio_ms=420)
    store.set_response_latency(a, "r2", first_played_ms=510)
    row = store.conn.execute(
        "SELECT status, created_at, done_at, first_audio_ms, first_played_ms FROM responses"
        " WHERE response_id = 'r1'"
    ).fetchone()
    assert row == ("completed", format_ts(at(1)), format_ts(at(3)), None, None)
    lat = store.conn.execute(
        "SELECT first_audio_ms, first_played_ms, done_at IS NOT NULL FROM responses"
        " WHERE response_id = 'r2'"
    ).fetchone()
    assert lat == (420, 510, 1)
    totals = {u.session_id: u for u in store.usage_totals()}
    assert (totals[a].responses, totals[a].input_text, totals[a].input_audio) == (2, 20, 60)
    assert (totals[a].input_cached, totals[a].output_text, totals[a].output_audio) == (16, 10, 30)
    assert (totals[a].input_total, totals[a].output_total) == (80, 40)
    assert (totals[b].responses, totals[b].output_total) == (0, 0)
    assert [u.session_id for u in store.usage_totals([b])] == [b]


def test_errors_are_recorded(store: Store) -> None:
    sid = new_session(store)
    store.record_error(sid, source="service", type="invalid_request_error", code="bad_voice",
                       message="Invalid voice", at=at(1))  # fmt: skip
    store.record_error(None, source="local", type="connection", code=None, message="reset")
    assert [(e.session_id, e.source, e.code, e.message) for e in store.list_errors()] == [
        (sid, "service", "bad_voice", "Invalid voice"),
        (None, "local", None, "reset"),
    ]
    assert len(store.list_errors(sid)) == 1
    with pytest.raises(ValueError):
        store.record_error(sid, source="elsewhere", type=None, code=None, message="x")


# ---------------------------------------------------------------------------- reads


def test_sessions_ids_order_and_counts(store: Store) -> None:
    later = new_session(store, 3600, metadata={"host": "kitchen"})
    earlier = new_session(store, 0)
    cont = new_session(store, 7200, previous_session_id=later)
    assert re.fullmatch(r"20251121T093000Z-[0-9a-f]{6}", earlier)
    store.set_service_session_id(earlier, "sess_abc")
    store.end_session(earlier, at(30))
    store.upsert_message(earlier, role="user", item_id="u1", text="hi")
    store.upsert_message(earlier, role="assistant", item_id="a1", text="beep")
    store.upsert_message(earlier, role="user", item_id="u2", text="again")
    rows = store.list_sessions()
    assert [r.id for r in rows] == [earlier, later, cont]
    first = rows[0]
    assert (first.turns, first.messages, first.service_session_id) == (2, 3, "sess_abc")
    assert first.ended_at == format_ts(at(30))
    assert rows[1].ended_at is None
    assert rows[2].previous_session_id == later
    assert store.get_session(cont) == rows[2]
    assert store.get_session("missing") is None
    meta = store.conn.execute("SELECT metadata FROM sessions WHERE id = ?", (later,)).fetchone()
    assert meta == ('{"host": "kitchen"}',)


def test_iter_messages_order_and_filters(store: Store) -> None:
    b = new_session(store, 600)
    a = new_session(store, 0)
    # Written out of order; equal timestamps keep insertion order.
    store.upsert_message(b, role="user", item_id="b1", text="b-first", created_at=at(601))
    store.upsert_message(a, role="assistant", item_id="a2", text="a-second", created_at=at(5))
    store.upsert_message(a, role="user", item_id="a1", text="a-first", created_at=at(1))
    store.upsert_message(a, role="user", item_id="a3", text="a-tie-1", created_at=at(9))
    store.upsert_message(a, role="assistant", item_id="a4", text="a-tie-2", created_at=at(9))
    texts = [m.text for m in store.iter_messages()]
    assert texts == ["a-first", "a-second", "a-tie-1", "a-tie-2", "b-first"]
    assert [m.text for m in store.iter_messages(sessions=[b])] == ["b-first"]
    assert [m.text for m in store.iter_messages(role="assistant")] == ["a-second", "a-tie-2"]
    assert [m.text for m in store.iter_messages(since=at(5), until=at(601))] == [
        "a-second", "a-tie-1", "a-tie-2"
    ]  # fmt: skip
    with pytest.raises(ValueError):
        list(store.iter_messages(role="system"))


def test_recent_turns_are_the_last_ones_oldest_first(store: Store) -> None:
    a = new_session(store, 0)
    b = new_session(store, 100, previous_session_id=a)
    store.upsert_message(b, role="user", item_id="b1", text="b1", created_at=at(101))
    store.upsert_message(a, role="user", item_id="a1", text="a1", created_at=at(1))
    store.upsert_message(a, role="assistant", item_id="a2", text="a2", created_at=at(2))
    store.upsert_message(a, role="user", item_id="a3", text="", created_at=at(3))
    store.upsert_message(b, role="assistant", item_id="b2", text="b2", created_at=at(102))
    assert store.recent_turns(None, 3) == [("assistant", "a2"), ("user", "b1"), ("assistant", "b2")]
    assert store.recent_turns([a, b], 10) == [
        ("user", "a1"), ("assistant", "a2"), ("user", "b1"), ("assistant", "b2")
    ]  # fmt: skip
    assert store.recent_turns([a], 1) == [("assistant", "a2")]
    assert store.recent_turns(None, 0) == []


def test_time_format() -> None:
    assert format_ts(datetime(2026, 11, 21, 9, 30, 0, 123999)) == "2026-11-21T09:30:00.123Z"
    cet = timezone(timedelta(hours=1))
    assert format_ts(datetime(2026, 11, 21, 10, 30, tzinfo=cet)) == "2026-11-21T09:30:00.000Z"
    assert parse_ts("2026-11-21T09:30:00.123Z") == datetime(
        2026, 11, 21, 9, 30, 0, 123000, tzinfo=timezone.utc
    )
