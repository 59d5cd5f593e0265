"""The database schema, its version history and the migrations between versions.

``PRAGMA application_id`` marks a file as ours; ``PRAGMA user_version`` is the schema version:

* v1: sessions, messages (no interruption columns), responses (status and times only), errors.
* v2: ``messages.interrupted`` / ``messages.played_ms``; token usage and latency columns
  on ``responses``.
* v3: order from the conversation, not the wall clock: ``sessions.seq`` (assigned at insert,
  strictly increasing) and ``messages.seq`` (the protocol core's per-session sequence), with
  the indexes that stream in that order; ``responses.status_details`` (JSON text).
* v4: ``tool_executions`` (the tool audit trail, in the messages' conversation order);
  ``messages.text_kept`` / ``tool_executions.text_kept`` (0: written in privacy mode).
* v5: the shipping change log, watermarks and target (:mod:`r2d2voice.storage.shipping.local`):
  triggers log every insert/update once the robot first ships.
* v6: the memory (:mod:`r2d2voice.storage.memory_schema`): ``facts``, ``recall_exclusions``, the
  FTS5 index over messages and facts with the triggers keeping it in sync (the migration
  indexes every message kept so far), and the change log of the two new tables.

New databases are created with ``auto_vacuum = INCREMENTAL``, so pruning can give space back
to the filesystem; that pragma only takes effect before the first table exists, so older files
keep ``NONE`` until a one-time ``VACUUM`` (``r2d2voice prune`` does it, see
:mod:`r2d2voice.storage.retention`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from r2d2voice.errors import UsageError
from r2d2voice.storage.health import StoreUnavailable, is_not_a_database, is_transient
from r2d2voice.storage.memory_schema import MEMORY_TABLES, migrate_memory
from r2d2voice.storage.shipping.local import migrate_record_ship_log, migrate_ship_log

__all__ = ["APPLICATION_ID", "ERROR_SOURCES", "MIGRATIONS", "ROLES", "SCHEMA_VERSION",
           "TOOL_ROW_STATUSES", "prepare"]

#: ``PRAGMA application_id`` of every r2d2voice database (ASCII "r2d2").
APPLICATION_ID = 0x72326432
#: The schema version this code writes; older files are migrated forward on open.
SCHEMA_VERSION = 6

ROLES = ("user", "assistant")
ERROR_SOURCES = ("service", "local")
#: ``tool_executions.status``: running until the result is stored, then final.
TOOL_ROW_STATUSES = ("running", "ok", "error", "timeout", "rejected")
#: WAL file kept at most this big after a checkpoint (bytes; a prune can swell it).
WAL_SIZE_LIMIT = 4 * 1024 * 1024

_TOOL_EXECUTIONS = """
CREATE TABLE tool_executions (
    id          INTEGER PRIMARY KEY,    -- rowid: tie-break for equal seq
    session_id  TEXT NOT NULL REFERENCES sessions(id),
    seq         INTEGER NOT NULL,       -- conversation order, shared with messages
    response_id TEXT,
    item_id     TEXT,
    call_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    arguments   TEXT,                   -- JSON text as received (NULL: not kept)
    output      TEXT,                   -- what the model was told (NULL: none yet / not kept)
    status      TEXT NOT NULL CHECK (status IN
                    ('running', 'ok', 'error', 'timeout', 'rejected')),
    exit_code   INTEGER,
    started_at  TEXT NOT NULL,          -- wall-clock label
    duration_ms INTEGER,                -- monotonic
    text_kept   INTEGER NOT NULL DEFAULT 1 CHECK (text_kept IN (0, 1)),
    UNIQUE (session_id, call_id)
);
CREATE INDEX tool_executions_by_seq ON tool_executions(session_id, seq);
"""

SCHEMA = f"""
CREATE TABLE sessions (
    id                  TEXT NOT NULL PRIMARY KEY,
    seq                 INTEGER NOT NULL,   -- order of sessions: max + 1 at insert
    started_at          TEXT NOT NULL,      -- wall-clock label
    ended_at            TEXT,
    backend             TEXT NOT NULL,
    model               TEXT NOT NULL,
    voice               TEXT,
    service_session_id  TEXT,
    previous_session_id TEXT REFERENCES sessions(id),
    metadata            TEXT                -- JSON object
);
-- UNIQUE + NOT NULL: lets SQLite stream sessions-then-messages order with no sort.
CREATE UNIQUE INDEX sessions_by_seq ON sessions(seq);

CREATE TABLE messages (
    id          INTEGER PRIMARY KEY,    -- rowid: tie-break for equal seq
    session_id  TEXT NOT NULL REFERENCES sessions(id),
    seq         INTEGER NOT NULL,       -- conversation order within the session
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text        TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,          -- wall-clock label, stamped at first insert
    item_id     TEXT NOT NULL,
    response_id TEXT,
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    played_ms   INTEGER,                -- audio played before the interruption
    raw_event   TEXT,                   -- the server event JSON the text came from
    text_kept   INTEGER NOT NULL DEFAULT 1 CHECK (text_kept IN (0, 1)),
    UNIQUE (session_id, item_id, role)
);
CREATE INDEX messages_by_seq ON messages(session_id, seq);

CREATE TABLE responses (
    session_id          TEXT NOT NULL REFERENCES sessions(id),
    response_id         TEXT NOT NULL,
    status              TEXT NOT NULL,
    created_at          TEXT NOT NULL,  -- wall-clock labels
    done_at             TEXT,
    input_text_tokens   INTEGER,
    input_audio_tokens  INTEGER,
    input_cached_tokens INTEGER,
    output_text_tokens  INTEGER,
    output_audio_tokens INTEGER,
    first_audio_ms      INTEGER,        -- speech stopped -> first audio received (monotonic)
    first_played_ms     INTEGER,        -- speech stopped -> first audio played (monotonic)
    status_details      TEXT,           -- JSON object from response.done
    PRIMARY KEY (session_id, response_id)
);

CREATE TABLE errors (
    id         INTEGER PRIMARY KEY,     -- order of errors
    session_id TEXT REFERENCES sessions(id),
    at         TEXT NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('service', 'local')),
    type       TEXT,
    code       TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX errors_by_session ON errors(session_id, at);
{_TOOL_EXECUTIONS}
PRAGMA application_id = {APPLICATION_ID};
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """v1 had no interruption columns on messages and no usage/latency on responses."""
    for stmt in (
        "ALTER TABLE messages ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0"
        " CHECK (interrupted IN (0, 1))",
        "ALTER TABLE messages ADD COLUMN played_ms INTEGER",
        "ALTER TABLE responses ADD COLUMN input_text_tokens INTEGER",
        "ALTER TABLE responses ADD COLUMN input_audio_tokens INTEGER",
        "ALTER TABLE responses ADD COLUMN input_cached_tokens INTEGER",
        "ALTER TABLE responses ADD COLUMN output_text_tokens INTEGER",
        "ALTER TABLE responses ADD COLUMN output_audio_tokens INTEGER",
        "ALTER TABLE responses ADD COLUMN first_audio_ms INTEGER",
        "ALTER TABLE responses ADD COLUMN first_played_ms INTEGER",
    ):
        conn.execute(stmt)


_MIGRATE_2_TO_3 = """
ALTER TABLE sessions ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE responses ADD COLUMN status_details TEXT;

CREATE TEMP TABLE session_order (id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
INSERT INTO temp.session_order
    SELECT id, row_number() OVER (ORDER BY started_at, id) FROM sessions;
UPDATE sessions SET seq = (SELECT o.seq FROM temp.session_order AS o WHERE o.id = sessions.id);
DROP TABLE temp.session_order;

CREATE TEMP TABLE message_order (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
INSERT INTO temp.message_order
    SELECT id, row_number() OVER (PARTITION BY session_id ORDER BY created_at, id)
    FROM messages;
UPDATE messages SET seq = (SELECT o.seq FROM temp.message_order AS o WHERE o.id = messages.id);
DROP TABLE temp.message_order;

DROP INDEX sessions_by_start;
DROP INDEX messages_by_time;
CREATE UNIQUE INDEX sessions_by_seq ON sessions(seq);
CREATE INDEX messages_by_seq ON messages(session_id, seq);
"""


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """v2 ordered by wall-clock time; v3 keeps that order once, as sequence numbers."""
    for stmt in split_sql(_MIGRATE_2_TO_3):
        conn.execute(stmt)


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """v4 adds the tool audit trail and marks rows written in privacy mode."""
    conn.execute("ALTER TABLE messages ADD COLUMN text_kept INTEGER NOT NULL DEFAULT 1"
                 " CHECK (text_kept IN (0, 1))")
    for stmt in split_sql(_TOOL_EXECUTIONS):
        conn.execute(stmt)


def _migrate_5_to_6(conn: sqlite3.Connection) -> None:
    """v6 adds the memory (facts, recall exclusions, the full-text index) and its change log."""
    migrate_memory(conn)
    migrate_ship_log(conn, MEMORY_TABLES)


#: ``MIGRATIONS[n]`` upgrades a version-n database to version n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: migrate_record_ship_log,  # v5: change log + watermarks for shipping to a fleet server
    5: _migrate_5_to_6,  # v6: memory
}


def split_sql(script: str) -> list[str]:
    """Statements of a schema script (no ';' inside literals), comments stripped."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _probe(conn: sqlite3.Connection) -> tuple[int, int, bool]:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    return app_id, version, empty


def prepare(conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
    """Check that ``conn`` is an r2d2voice database this code understands; read-write, also
    set the pragmas and create the schema or migrate it forward (one transaction).

    Raises :class:`UsageError` for a foreign, newer, or (read-only) older database, and
    (read-write) :class:`StoreUnavailable` when the disk is full, fails or the file is locked.
    """
    foreign = UsageError(f"{path} is not an r2d2voice database")
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        app_id, version, empty = _probe(conn)
        fresh = empty and app_id == 0 and version == 0
        if not fresh and (app_id != APPLICATION_ID or version < 1):
            raise foreign
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"{path} has schema version {version}, newer than this r2d2voice "
                f"understands ({SCHEMA_VERSION}); upgrade r2d2voice"
            )
        if readonly:
            if fresh:
                raise foreign
            if version < SCHEMA_VERSION:
                raise UsageError(
                    f"{path} has schema version {version}; open it once read-write "
                    f"(e.g. run the appliance) to upgrade it to {SCHEMA_VERSION}"
                )
            conn.execute("PRAGMA foreign_keys = ON")
            return
        if fresh:  # only before the first table exists; older files: see retention.py
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys = ON")
        if version == SCHEMA_VERSION:
            return
        _create_or_migrate(conn)
    except sqlite3.DatabaseError as exc:
        if is_not_a_database(exc):  # SQLite read the header: not an SQLite file at all
            raise foreign from None
        if not readonly and is_transient(exc):
            raise StoreUnavailable(f"cannot open database {path}: {exc}") from exc
        raise UsageError(f"{path} is not a usable r2d2voice database: {exc}") from exc


def _create_or_migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have created or migrated it while we waited.
        app_id, version, empty = _probe(conn)
        if empty and app_id == 0 and version == 0:
            for stmt in split_sql(SCHEMA):
                conn.execute(stmt)
            # trigger bodies hold ';': not part of the SCHEMA script
            migrate_memory(conn)
            migrate_ship_log(conn)
        else:
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
