"""The robot's side of shipping, in its SQLite database: a change log and a watermark per table.

Change tracking: AFTER INSERT / AFTER UPDATE triggers on the shipped tables (the record's five,
and the memory's two since schema v6) append the
changed row's key to that table's log (``ship_log_sessions``, ``ship_log_messages``, …; the log's
``seq`` is an INTEGER PRIMARY KEY, so an append is one b-tree insert and nothing else). A row
updated after it was shipped (a session's end, an interruption flag, a late transcript, a tool
result) is logged again and so shipped again. ``ship_state`` holds each table's watermark: the
last log ``seq`` the fleet server has committed. Deletions (retention) are not logged.

``ship_target`` names the server the watermarks belong to (its fleet id) and the device id the
rows are shipped as. The triggers log nothing until a target exists, so a robot that never
ships pays one lookup per write and keeps no log. Shipping to another target (a new or rebuilt
server, another device id) *arms* it: in one transaction the logs are refilled with the key of
every existing row and the watermarks reset, so the new server gets everything.

Keys: the integer primary key of messages, errors, tool executions and facts; the natural key
of sessions, responses and recall exclusions (their implicit rowids may change at a ``VACUUM``).

Log entries at or below a watermark are deleted as shipping advances, except the last one, so
that ``seq`` (max + 1) never goes back below the watermark.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from r2d2voice.storage.memory_schema import MEMORY_TABLES
from r2d2voice.storage.shipping.tables import TABLES

__all__ = [
    "RECORD_TABLES",
    "SHIPPED_TABLES",
    "SHIP_LOG_SCHEMA",
    "Change",
    "Target",
    "advance",
    "arm",
    "current_target",
    "ensure_ship_log",
    "is_shipped",
    "log_marks",
    "migrate_record_ship_log",
    "migrate_ship_log",
    "pending_sessions",
    "read_changes",
    "shipped_sessions",
    "watermarks",
]

#: The record's tables (schema v5 logs these), in shipping order: sessions first, so a batch's
#: rows find their session on the server.
RECORD_TABLES = ("sessions", "messages", "responses", "tool_executions", "errors")
#: Every shipped table: the record's, then the memory's (schema v6).
SHIPPED_TABLES = (*RECORD_TABLES, *MEMORY_TABLES)

# Per table: the log's key columns, and how a log entry finds its row (``l``: log, ``t``: row).
_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "sessions": (("id",), "t.id = l.id"),
    "messages": (("id",), "t.id = l.id"),
    "responses": (("session_id", "response_id"),
                  "t.session_id = l.session_id AND t.response_id = l.response_id"),
    "tool_executions": (("id",), "t.id = l.id"),
    "errors": (("id",), "t.id = l.id"),
    "facts": (("id",), "t.id = l.id"),
    "recall_exclusions": (("session_id", "item_id", "role"),
                          "t.session_id = l.session_id AND t.item_id = l.item_id"
                          " AND t.role = l.role"),
}
_KEY_TYPES = {"sessions": "TEXT", "responses": "TEXT",
              "recall_exclusions": "TEXT"}  # the others: INTEGER
# The session a log entry belongs to (for retention); facts belong to none.
_SESSION_OF = {"sessions": "l.id", "responses": "l.session_id",
               "recall_exclusions": "l.session_id"}  # the others: t.session_id
_NO_SESSION = ("facts",)


def _log(table: str) -> str:
    return f"ship_log_{table}"


def _log_ddl(table: str) -> str:
    keys, _ = _KEYS[table]
    kind = _KEY_TYPES.get(table, "INTEGER")
    cols = ", ".join(f"{k} {kind} NOT NULL" for k in keys)
    new = ", ".join(f"NEW.{k}" for k in keys)
    names = ", ".join(keys)
    ddl = f"CREATE TABLE IF NOT EXISTS {_log(table)} (seq INTEGER PRIMARY KEY, {cols});\n"
    for event in ("INSERT", "UPDATE"):
        ddl += (
            f"CREATE TRIGGER IF NOT EXISTS {_log(table)}_{event.lower()}"
            f" AFTER {event} ON {table} WHEN EXISTS (SELECT 1 FROM ship_target)\n"
            f"BEGIN INSERT INTO {_log(table)} ({names}) VALUES ({new}); END;\n"
        )
    return ddl


#: Watermarks and target (idempotent: ``IF NOT EXISTS`` throughout); the logs come per table.
SHIP_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ship_target (
    id          INTEGER PRIMARY KEY CHECK (id = 1),  -- at most one target
    generation  INTEGER NOT NULL,   -- +1 at each arming: a shipper of an older one stops
    fleet_id    TEXT NOT NULL,      -- the server's own id
    device_id   TEXT NOT NULL,      -- what the rows are shipped as
    server      TEXT NOT NULL,      -- host/db, for people (never a password)
    armed_at    TEXT NOT NULL       -- wall-clock label
);
CREATE TABLE IF NOT EXISTS ship_state (
    table_name  TEXT PRIMARY KEY,
    shipped_seq INTEGER NOT NULL,   -- the watermark: log entries <= it are on the server
    shipped_at  TEXT                -- wall-clock label of the last advance
);
"""
#: The change log, watermarks and target of every shipped table.
SHIP_LOG_SCHEMA = SHIP_STATE_SCHEMA + "".join(_log_ddl(t) for t in SHIPPED_TABLES)


def _statements(script: str) -> list[str]:
    """Statements of :data:`SHIP_LOG_SCHEMA` (a trigger body's ``; END`` stays whole)."""
    return [stmt.strip() for stmt in script.split(";\n") if stmt.strip()]


def migrate_ship_log(conn: sqlite3.Connection,
                     tables: Sequence[str] = SHIPPED_TABLES) -> None:
    """Create ``ship_state``, ``ship_target`` and the change log of ``tables`` with its triggers
    (a schema migration step: runs inside the caller's transaction, idempotent). Schema v5
    logs :data:`RECORD_TABLES`; v6 adds the memory's."""
    for table in tables:
        keys, _ = _KEYS[table]
        for key in keys:  # a database missing a shipped table is not ours to extend
            conn.execute(f"SELECT {key} FROM {table} LIMIT 0")
    for stmt in _statements(SHIP_STATE_SCHEMA + "".join(_log_ddl(t) for t in tables)):
        conn.execute(stmt)
    # a robot that ships already: the new tables' watermarks start at 0 (arming sets them all)
    conn.executemany("INSERT OR IGNORE INTO ship_state (table_name, shipped_seq)"
                     " SELECT ?, 0 FROM ship_target", [(t,) for t in tables])


def migrate_record_ship_log(conn: sqlite3.Connection) -> None:
    """Schema v5: :func:`migrate_ship_log` of the record's tables."""
    migrate_ship_log(conn, RECORD_TABLES)


def ensure_ship_log(conn: sqlite3.Connection) -> None:
    """:func:`migrate_ship_log` in its own transaction, unless already applied (for databases
    whose schema version predates it)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                    (f"{_log(SHIPPED_TABLES[-1])}_update",)).fetchone():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        migrate_ship_log(conn)
        conn.execute("COMMIT")
    except BaseException:  # roll back and re-raise, whatever it is
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- target and watermarks ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the watermarks point: a server (by its fleet id) and a device id."""

    generation: int
    fleet_id: str
    device_id: str
    server: str


def current_target(conn: sqlite3.Connection) -> Target | None:
    row = conn.execute(
        "SELECT generation, fleet_id, device_id, server FROM ship_target"
    ).fetchone()
    return Target(*row) if row else None


def arm(conn: sqlite3.Connection, fleet_id: str, device_id: str, server: str,
        now: str) -> tuple[Target, bool]:
    """The target for (``fleet_id``, ``device_id``), arming it if it is not the current one:
    every existing row is logged and the watermarks reset, in one transaction. Returns the
    target and whether it was armed now. The usual case (the same target) writes nothing."""
    old = current_target(conn)
    if old is not None and (old.fleet_id, old.device_id, old.server) == (fleet_id, device_id,
                                                                         server):
        return old, False
    conn.execute("BEGIN IMMEDIATE")
    try:
        old = current_target(conn)  # another ship may have armed it meanwhile
        if old is not None and (old.fleet_id, old.device_id) == (fleet_id, device_id):
            if old.server != server:
                conn.execute("UPDATE ship_target SET server = ?", (server,))
            conn.execute("COMMIT")
            return Target(old.generation, fleet_id, device_id, server), False
        target = Target((old.generation if old else 0) + 1, fleet_id, device_id, server)
        conn.execute("INSERT OR REPLACE INTO ship_target (id, generation, fleet_id, device_id,"
                     " server, armed_at) VALUES (1, ?, ?, ?, ?, ?)",
                     (target.generation, fleet_id, device_id, server, now))
        for table in SHIPPED_TABLES:
            keys = ", ".join(_KEYS[table][0])
            order = "seq" if table == "sessions" else keys
            conn.execute(f"DELETE FROM {_log(table)}")
            conn.execute(f"INSERT INTO {_log(table)} ({keys})"
                         f" SELECT {keys} FROM {table} ORDER BY {order}")
            conn.execute("INSERT OR REPLACE INTO ship_state (table_name, shipped_seq,"
                         " shipped_at) VALUES (?, 0, NULL)", (table,))
        conn.execute("COMMIT")
    except BaseException:  # roll back and re-raise, whatever it is
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return target, True


def watermarks(conn: sqlite3.Connection) -> dict[str, int]:
    """Each shipped table's watermark (0 before the first ship)."""
    marks = dict.fromkeys(SHIPPED_TABLES, 0)
    marks.update(conn.execute("SELECT table_name, shipped_seq FROM ship_state").fetchall())
    return marks


def log_marks(conn: sqlite3.Connection) -> dict[str, int]:
    """The newest log ``seq`` of each table, read in one snapshot: shipping up to these
    ships every change committed so far, each with its session before it."""
    conn.execute("BEGIN")
    try:
        return {t: conn.execute(f"SELECT COALESCE(max(seq), 0) FROM {_log(t)}").fetchone()[0]
                for t in SHIPPED_TABLES}
    finally:
        conn.execute("COMMIT")


def advance(conn: sqlite3.Connection, target: Target, table: str, seq: int,
            now: str) -> bool:
    """Move ``table``'s watermark up to ``seq`` (the server has committed everything up to it)
    and drop the log below it. False, and nothing changed, when ``target`` was replaced."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = current_target(conn)
        if current is None or current.generation != target.generation:
            conn.execute("ROLLBACK")
            return False
        conn.execute("UPDATE ship_state SET shipped_seq = max(shipped_seq, ?), shipped_at = ?"
                      " WHERE table_name = ?", (seq, now, table))
        conn.execute(f"DELETE FROM {_log(table)} WHERE seq < ?", (seq,))
        conn.execute("COMMIT")
    except BaseException:  # roll back and re-raise, whatever it is
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return True


# -- reading changes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A batch of logged changes: the rows as they are now (values in the table's column
    order; deleted rows left out), and the log ``seq`` of the batch's last entry."""

    rows: list[tuple[Any, ...]]
    last_seq: int
    entries: int


def read_changes(conn: sqlite3.Connection, table: str, after: int, upto: int,
                 limit: int) -> Change | None:
    """Up to ``limit`` log entries of ``table`` in (``after``, ``upto``], joined to their rows
    (a row logged twice comes twice: the uploader keeps one per key). None when there are
    none."""
    columns = TABLES[table].columns
    _, join = _KEYS[table]
    select = ", ".join(f"t.{c}" for c in columns)
    cur = conn.execute(
        f"SELECT l.seq, t.rowid IS NOT NULL, {select} FROM {_log(table)} AS l"
        f" LEFT JOIN {table} AS t ON {join}"
        " WHERE l.seq > ? AND l.seq <= ? ORDER BY l.seq LIMIT ?", (after, upto, limit))
    found = cur.fetchall()
    if not found:
        return None
    return Change([entry[2:] for entry in found if entry[1]], found[-1][0], len(found))


# -- retention --------------------------------------------------------------------------------


def pending_sessions(conn: sqlite3.Connection) -> set[str] | None:
    """Sessions with a change (in any table, their end included) the server does not have
    yet; None when the database has never been shipped."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ship_target'").fetchone():
        return None
    if current_target(conn) is None:
        return None
    parts = []
    for table in SHIPPED_TABLES:
        if table in _NO_SESSION:
            continue
        _, join = _KEYS[table]
        sid = _SESSION_OF.get(table, "t.session_id")
        rows = "" if table in _SESSION_OF else f" JOIN {table} AS t ON {join}"
        parts.append(
            f"SELECT {sid} FROM {_log(table)} AS l{rows} WHERE l.seq > (SELECT shipped_seq"
            f" FROM ship_state WHERE table_name = '{table}') AND {sid} IS NOT NULL"
        )
    return {sid for (sid,) in conn.execute(" UNION ".join(parts))}


def shipped_sessions(conn: sqlite3.Connection, session_ids: Sequence[str]) -> Collection[str]:
    """The sessions among ``session_ids`` whose every row, as it is now, is on the fleet
    server (the ``only_shipped`` filter of :func:`r2d2voice.storage.retention.prune`)."""
    pending = pending_sessions(conn)
    if pending is None:
        return set()
    return {sid for sid in session_ids if sid not in pending}


def is_shipped(conn: sqlite3.Connection, session_id: str) -> bool:
    """Whether every row of ``session_id`` (and its end) is on the fleet server."""
    return bool(shipped_sessions(conn, [session_id]))
