"""The memory in SQLite: the schema v6 migration from the real v5 schema, the full-text index
kept in sync by triggers (checked with FTS5's own integrity-check), ranking by relevance and
recency, bounded results, forgetting, privacy mode and retention. Synchronous, real SQLite."""

from __future__ import annotations

import io
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from storage_support import SteppedClock
from test_store import build, shape

from r2d2voice.errors import UsageError
from r2d2voice.storage import memory
from r2d2voice.storage.database import Store
from r2d2voice.storage.memory import TooBroad, forget, iter_facts, last_talked, recall, remember
from r2d2voice.storage.retention import prune_and_shrink, prune_command
from r2d2voice.storage.schema import APPLICATION_ID, SCHEMA_VERSION
from r2d2voice.storage.shipping.local import watermarks

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)

# Version 5 as it shipped (the schema a robot has before the memory), with rows: a
# conversation, a privacy-mode message (no text) and an armed shipping target.
V5_SCHEMA = f"""
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
    played_ms INTEGER, raw_event TEXT,
    text_kept INTEGER NOT NULL DEFAULT 1 CHECK (text_kept IN (0, 1)),
    UNIQUE (session_id, item_id, role)
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
CREATE TABLE tool_executions (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL, response_id TEXT, item_id TEXT, call_id TEXT NOT NULL,
    name TEXT NOT NULL, arguments TEXT, output TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'error', 'timeout', 'rejected')),
    exit_code INTEGER, started_at TEXT NOT NULL, duration_ms INTEGER,
    text_kept INTEGER NOT NULL DEFAULT 1 CHECK (text_kept IN (0, 1)),
    UNIQUE (session_id, call_id)
);
CREATE INDEX tool_executions_by_seq ON tool_executions(session_id, seq);
CREATE TABLE ship_target (
    id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL,
    fleet_id TEXT NOT NULL, device_id TEXT NOT NULL, server TEXT NOT NULL,
    armed_at TEXT NOT NULL
);
CREATE TABLE ship_state (
    table_name TEXT PRIMARY KEY, shipped_seq INTEGER NOT NULL, shipped_at TEXT
);
{"".join(f'''
CREATE TABLE ship_log_{t} (seq INTEGER PRIMARY KEY, {cols});
CREATE TRIGGER ship_log_{t}_insert AFTER INSERT ON {t} WHEN EXISTS (SELECT 1 FROM ship_target)
BEGIN INSERT INTO ship_log_{t} ({names}) VALUES ({new}); END;
CREATE TRIGGER ship_log_{t}_update AFTER UPDATE ON {t} WHEN EXISTS (SELECT 1 FROM ship_target)
BEGIN INSERT INTO ship_log_{t} ({names}) VALUES ({new}); END;'''
    for t, cols, names, new in (
        ("sessions", "id TEXT NOT NULL", "id", "NEW.id"),
        ("messages", "id INTEGER NOT NULL", "id", "NEW.id"),
        ("responses", "session_id TEXT NOT NULL, response_id TEXT NOT NULL",
         "session_id, response_id", "NEW.session_id, NEW.response_id"),
        ("tool_executions", "id INTEGER NOT NULL", "id", "NEW.id"),
        ("errors", "id INTEGER NOT NULL", "id", "NEW.id")))}
INSERT INTO ship_target VALUES (1, 1, 'fleet-1', 'r2', 'pg/fleet', '2026-11-20T08:00:00.000Z');
INSERT INTO ship_state VALUES ('sessions', 0, NULL), ('messages', 0, NULL),
    ('responses', 0, NULL), ('tool_executions', 0, NULL), ('errors', 0, NULL);
INSERT INTO sessions (id, seq, started_at, ended_at, backend, model, voice) VALUES
    ('S1', 1, '2026-11-19T08:00:00.000Z', '2026-11-19T08:05:00.000Z', 'openai', 'gpt', 'ash'),
    ('S2', 2, '2026-11-20T08:00:00.000Z', NULL, 'openai', 'gpt', 'ash');
INSERT INTO messages (session_id, seq, role, text, created_at, item_id, text_kept) VALUES
    ('S1', 1, 'user', 'Our cat Mirabelle sleeps on the piano', '2026-11-19T08:00:01.000Z',
     'u1', 1),
    ('S1', 2, 'assistant', 'Mirabelle has good taste in music!', '2026-11-19T08:00:02.000Z',
     'a1', 1),
    ('S2', 1, 'user', '', '2026-11-20T08:00:01.000Z', 'u1', 0);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 5;
"""


def check_index(conn: sqlite3.Connection) -> None:
    """FTS5's own check: each index holds exactly the rows (and words) of its view."""
    for table in ("messages_fts", "facts_fts"):
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")


def indexed(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM messages_fts").fetchone()[0]


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(NOW - 10 * DAY)


@pytest.fixture
def store(tmp_path: Path, clock: SteppedClock):
    with Store.open(tmp_path / "r2.db", now=clock) as s:
        yield s


def talk(store: Store, clock: SteppedClock, *lines: str, days_ago: float | None = None) -> str:
    """A session whose messages alternate user / assistant, stamped ``days_ago``."""
    if days_ago is not None:
        clock.set(NOW - timedelta(days=days_ago))
    sid = store.write.start_session(backend="local", model="m", voice=None)
    for seq, text in enumerate(lines, 1):
        role = "user" if seq % 2 else "assistant"
        store.write.upsert_message(sid, role=role, item_id=f"i{seq}", seq=seq, text=text)
    return sid


def words(found: memory.Recollection) -> list[str]:
    return [p.words for p in found.passages]


# ---------------------------------------------------------------------------- the migration


def test_a_v5_database_gains_the_memory_and_indexes_what_was_said(tmp_path: Path) -> None:
    db = tmp_path / "v5.db"
    build(db, V5_SCHEMA)
    with Store.open(db) as s:
        conn = s.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        check_index(conn)
        assert indexed(conn) == 2  # the privacy-mode message has no text to index
        found = recall(conn, "mirabelle piano", now=NOW)
        assert words(found) == ["Our cat Mirabelle sleeps on the piano",
                                "Mirabelle has good taste in music!"]
        assert [p.created_at for p in found.passages] == ["2026-11-19T08:00:01.000Z",
                                                          "2026-11-19T08:00:02.000Z"]
        # the export reads the record as before
        assert [m.text for m in s.read.iter_messages()][:2] == [
            "Our cat Mirabelle sleeps on the piano", "Mirabelle has good taste in music!"]
        # a robot that already ships: the memory's tables are logged and have watermarks
        fact, _ = remember(conn, "Mirabelle is a cat.", source="conversation", now=NOW)
        assert conn.execute("SELECT id FROM ship_log_facts").fetchall() == [(fact.id,)]
        assert watermarks(conn)["facts"] == 0
        assert conn.execute("SELECT count(*) FROM ship_state").fetchone()[0] == 7
    with Store.open(db, create=False) as r:  # it stays migrated
        assert recall(r.conn, "Mirabelle", now=NOW).facts == [fact]


def test_a_migrated_database_has_the_shape_of_a_new_one(tmp_path: Path) -> None:
    build(tmp_path / "v5.db", V5_SCHEMA)
    shapes = []
    for name in ("fresh.db", "v5.db"):
        with Store.open(tmp_path / name) as s:
            shapes.append(shape(s.conn))
            names = {n for (n,) in s.conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('trigger', 'view')")}
            shapes.append(names)
    assert shapes[0] == shapes[2] and shapes[1] == shapes[3]
    assert {"messages_fts_insert", "facts_fts_update", "memory_passages",
            "ship_log_facts_insert", "ship_log_recall_exclusions_update"} <= shapes[1]


def test_a_v5_database_opened_readonly_is_not_modified(tmp_path: Path) -> None:
    db = tmp_path / "v5.db"
    build(db, V5_SCHEMA)
    before = db.read_bytes()
    with pytest.raises(UsageError, match=r"schema version 5\b.*upgrade"):
        Store.open(db, create=False)
    assert db.read_bytes() == before


# ---------------------------------------------------------------------------- the index


def test_triggers_keep_the_index_equal_to_what_may_be_recalled(store: Store,
                                                               clock: SteppedClock) -> None:
    conn = store.conn
    sid = talk(store, clock, "We planted tomatoes", "Tomatoes need sun")
    # a late transcript replaces the words (the record's upsert); the index follows
    store.write.upsert_message(sid, role="user", item_id="i1", seq=1,
                               text="We planted courgettes")
    assert words(recall(conn, "courgettes", now=NOW)) == ["We planted courgettes"]
    assert words(recall(conn, "tomatoes", now=NOW)) == ["Tomatoes need sun"]
    # an interruption placeholder (no text yet) is not indexed, its transcript is
    store.write.mark_interrupted(sid, item_id="i3", seq=3, played_ms=300)
    assert indexed(conn) == 2
    store.write.upsert_message(sid, role="assistant", item_id="i3", seq=3, text="Beans too")
    assert words(recall(conn, "beans", now=NOW)) == ["Beans too"]
    check_index(conn)


def test_case_and_diacritics_do_not_matter(store: Store, clock: SteppedClock) -> None:
    talk(store, clock, "Zoë ordered a crème brûlée at the CAFÉ")
    for query in ("zoe", "creme brulee", "café", "Cafe"):
        assert words(recall(store.conn, query, now=NOW)) == [
            "Zoë ordered a crème brûlée at the CAFÉ"], query


def test_privacy_mode_indexes_nothing(tmp_path: Path, clock: SteppedClock) -> None:
    with Store.open(tmp_path / "p.db", now=clock, store_text=False) as s:
        talk(s, clock, "secret plans", "very secret")
        assert indexed(s.conn) == 0
        assert recall(s.conn, "secret", now=NOW) == memory.Recollection([], [])
        check_index(s.conn)


# ---------------------------------------------------------------------------- ranking


def test_recency_decides_between_equal_matches(store: Store, clock: SteppedClock) -> None:
    talk(store, clock, "the blue kite", days_ago=40)
    talk(store, clock, "the blue kite", days_ago=1)
    talk(store, clock, "the blue kite", days_ago=9)
    found = recall(store.conn, "kite", now=NOW)
    assert [p.created_at[:10] for p in found.passages] == [
        "2026-11-20", "2026-11-12", "2026-10-12"]
    assert memory.recency("2026-11-21T12:00:00.000Z", NOW) == pytest.approx(2.0)
    assert memory.recency("2026-10-22T12:00:00.000Z", NOW) == pytest.approx(1.5)


def test_a_clearly_better_old_match_beats_a_weak_new_one(store: Store,
                                                         clock: SteppedClock) -> None:
    # common words of the house, then the two candidates
    for i in range(20):
        talk(store, clock, f"we talked about the weather and lunch {i}", days_ago=30 + i)
    talk(store, clock, "Grandma Edith grows orchids in the greenhouse", days_ago=200)
    talk(store, clock, "the weather in the greenhouse was warm", days_ago=0.1)
    found = recall(store.conn, "Edith orchids greenhouse", now=NOW)
    assert words(found)[:2] == ["Grandma Edith grows orchids in the greenhouse",
                                "the weather in the greenhouse was warm"]


def test_facts_rank_among_facts_with_the_same_rule(store: Store, clock: SteppedClock) -> None:
    conn = store.conn
    old, _ = remember(conn, "Sam likes chess", source="owner", now=NOW - 90 * DAY)
    new, _ = remember(conn, "Sam likes chess on Sundays", source="conversation", now=NOW)
    remember(conn, "The car is blue", source="conversation", now=NOW)
    assert recall(conn, "chess", now=NOW).facts == [new, old]
    assert recall(conn, "sam chess", now=NOW).passages == []


def test_results_are_bounded_and_long_messages_come_as_a_snippet(
        store: Store, clock: SteppedClock) -> None:
    long = " ".join(["filler"] * 150 + ["the lighthouse keeper waved"] + ["filler"] * 150)
    talk(store, clock, long, *[f"lighthouse number {i}" for i in range(12)])
    found = recall(store.conn, "lighthouse keeper", now=NOW)
    assert len(found.passages) == 5
    assert found.passages[0].words != long and "lighthouse keeper waved" in found.passages[0].words
    assert len(found.passages[0].words) <= memory.PASSAGE_CHARS
    assert all(len(p.words) <= memory.PASSAGE_CHARS for p in found.passages)
    assert len(recall(store.conn, "lighthouse", now=NOW, passages=2).passages) == 2
    assert recall(store.conn, "!!! ???", now=NOW) == memory.Recollection([], [])


def test_words_too_common_to_rank_leave_the_rare_ones_or_the_newest(
        store: Store, clock: SteppedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """bm25 visits every match: words with more matches than the bound are left out of the
    ranking; if all are that common, the newest messages holding any of them are ranked by the
    share of the words they hold, and recency."""
    monkeypatch.setattr(memory, "RANKED_DOCS", 10)
    for i in range(30):
        talk(store, clock, f"what a day {i}", days_ago=60 - i)
    talk(store, clock, "what a day for the zeppelin", days_ago=45)
    talk(store, clock, "what now", days_ago=0.5)  # the newest, with one of the two words
    assert words(recall(store.conn, "what day zeppelin", now=NOW)) == [
        "what a day for the zeppelin"]
    newest = words(recall(store.conn, "what day", now=NOW))
    assert newest == [f"what a day {i}" for i in (29, 28, 27, 26, 25)]


# ---------------------------------------------------------------------------- remember, forget


def test_remember_keeps_a_fact_once_within_its_limits(store: Store) -> None:
    conn = store.conn
    fact, new = remember(conn, "  Anna's birthday is 3 May  ", source="conversation", now=NOW)
    assert new and fact.text == "Anna's birthday is 3 May" and fact.created_at[:10] == "2026-11-21"
    again, new = remember(conn, "anna's BIRTHDAY is 3 may", source="owner", now=NOW)
    assert (again, new) == (fact, False)
    other, new = remember(conn, "May 3 is Anna's birthday", source="owner", now=NOW)
    assert new and other.id > fact.id
    with pytest.raises(ValueError, match="empty"):
        remember(conn, "   ", source="owner", now=NOW)
    with pytest.raises(ValueError, match="at most 500"):
        remember(conn, "x" * 501, source="owner", now=NOW)
    remember(conn, "é" * 500, source="owner", now=NOW)  # characters, not bytes
    assert [f.id for f in iter_facts(conn)] == [3, 2, 1]  # newest first


def test_forget_takes_out_facts_and_passages_holding_every_word(
        store: Store, clock: SteppedClock) -> None:
    conn = store.conn
    sid = talk(store, clock, "My PIN is 4711, don't tell", "I will keep your PIN safe",
               "The weather is nice", days_ago=3)
    pin, _ = remember(conn, "The PIN is 4711", source="conversation", now=NOW)
    kept, _ = remember(conn, "The weather app is on the phone", source="conversation", now=NOW)
    done = forget(conn, "PIN", now=NOW)
    assert done.facts == [pin] and done.passages == 2
    assert [p.words for p in done.examples] == ["I will keep your PIN safe",
                                                "My PIN is 4711, don't tell"]
    assert recall(conn, "PIN 4711", now=NOW) == memory.Recollection([], [])
    assert [f.id for f in iter_facts(conn)] == [kept.id]
    assert conn.execute("SELECT forgotten_at FROM facts WHERE id = ?",
                        (pin.id,)).fetchone() == ("2026-11-21T12:00:00.000Z",)
    # only what holds every word: "weather nice" keeps the weather app
    assert forget(conn, "weather nice", now=NOW).facts == []
    assert [f.id for f in iter_facts(conn)] == [kept.id]
    # the record keeps every word
    assert [m.text for m in store.read.iter_messages()] == [
        "My PIN is 4711, don't tell", "I will keep your PIN safe", "The weather is nice"]
    # a late transcript of a forgotten message stays out of recall
    store.write.upsert_message(sid, role="user", item_id="i1", seq=1, text="My PIN is 4711!")
    assert recall(conn, "PIN", now=NOW).passages == []
    assert forget(conn, "PIN", now=NOW).nothing
    check_index(conn)


def test_a_forget_too_broad_forgets_nothing(store: Store, clock: SteppedClock) -> None:
    conn = store.conn
    talk(store, clock, *[f"good morning {i}" for i in range(6)])
    remember(conn, "good morning is said at breakfast", source="owner", now=NOW)
    with pytest.raises(TooBroad, match="more than 5"):
        forget(conn, "good morning", now=NOW, limit=5)
    assert len(recall(conn, "morning", now=NOW, passages=10).passages) == 6
    assert len(recall(conn, "morning", now=NOW).facts) == 1
    assert forget(conn, "good morning", now=NOW, limit=7).passages == 6
    with pytest.raises(ValueError, match="no words"):
        forget(conn, "?!", now=NOW)


def test_last_talked_is_the_last_message_of_the_latest_conversation(
        store: Store, clock: SteppedClock) -> None:
    conn = store.conn
    assert last_talked(conn) is None
    talk(store, clock, "hello", "hi", days_ago=2)
    store.write.start_session(backend="local", model="m", voice=None)  # nothing said in it
    assert last_talked(conn) == "2026-11-19T12:00:00.000Z"


# ---------------------------------------------------------------------------- retention


@pytest.mark.parametrize("by_hand", [True, False])
def test_pruned_conversations_leave_recall(tmp_path: Path, clock: SteppedClock,
                                           by_hand: bool) -> None:
    db = tmp_path / "r2.db"
    with Store.open(db, now=clock) as s:
        talk(s, clock, "the old rowing boat", "rowing is fun", days_ago=60)
        talk(s, clock, "the new rowing machine", days_ago=1)
        fact, _ = remember(s.conn, "Ben rows on Saturdays", source="conversation",
                           now=NOW - 60 * DAY)
        forget(s.conn, "rowing fun", now=NOW)
        clock.set(NOW)
        if not by_hand:  # the run's hourly prune: a bounded merge of the index
            prune_and_shrink(s.conn, NOW - 30 * DAY)
    if by_hand:
        prune_command(db, older_than="30d", now=clock, out=io.StringIO())
    with Store.open(db, now=clock) as s:
        found = recall(s.conn, "rowing rows", now=NOW)
        assert words(found) == ["the new rowing machine"]
        assert found.facts == [fact]  # facts live until forgotten
        # the exclusion went with its message
        assert s.conn.execute("SELECT count(*) FROM recall_exclusions").fetchone()[0] == 0
        check_index(s.conn)
