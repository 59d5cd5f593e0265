"""Keeping only what you should: deleting old conversations and giving the space back.

A session is old when everything in it (start, end, messages, tool executions, responses) is
labelled before the cutoff. Whole conversations go: the sessions of a reconnect chain
(``previous_session_id``) are deleted together, once every one of them is old, so a chain is
never cut. With shipping configured, ``only_shipped`` says which old sessions are on the
server; a conversation goes only when all of its sessions are (errors not tied to a session
are then kept, as nothing says whether they were shipped).

Space: databases created by this version use ``auto_vacuum = INCREMENTAL``, and a prune ends
with an incremental vacuum and a passive WAL checkpoint, so the file shrinks while ``run`` goes
on writing (WAL: readers never block, the writer waits at most its busy timeout, and the
recorder retries after that). Older files have no auto-vacuum; ``r2d2voice prune`` converts
them once with a full ``VACUUM`` (it needs free space about the size of the database and
holds the write lock while it runs); ``run``'s periodic prune never does.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TextIO

from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.storage.database import Store
from r2d2voice.storage.health import describe, is_transient
from r2d2voice.storage.timestamps import WallClock, format_ts, utc_now

__all__ = ["PRUNE_EVERY", "PruneResult", "ShippedFilter", "parse_age", "prune",
           "prune_and_shrink", "prune_command", "shrink"]

#: Seconds between two prunes inside ``run`` (with ``R2D2_RETENTION_DAYS``).
PRUNE_EVERY = 3600.0
#: ``only_shipped(conn, session_ids)`` -> the ids among them whose rows are all on the server
#: (called inside the prune's write transaction, on the writer's connection).
ShippedFilter = Callable[[sqlite3.Connection, Sequence[str]], Collection[str]]

#: FTS5 ``merge`` work (index pages) after a periodic prune
INDEX_MERGE_PAGES = 500
_CHUNK = 500  # ids per DELETE statement (SQLite allows 999 parameters at least)
_TABLES = ("tool_executions", "messages", "responses", "errors")
_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([wdhm]?)\s*", re.IGNORECASE)
_UNIT = {"w": "weeks", "d": "days", "": "days", "h": "hours", "m": "minutes"}

# The newest label of an old-started session: start, end, and its rows' labels.
_LAST_ACTIVITY = """
SELECT s.id, max(s.started_at, COALESCE(s.ended_at, ''),
       COALESCE((SELECT max(created_at) FROM messages WHERE session_id = s.id), ''),
       COALESCE((SELECT max(started_at) FROM tool_executions WHERE session_id = s.id), ''),
       COALESCE((SELECT max(COALESCE(done_at, created_at)) FROM responses
                 WHERE session_id = s.id), ''))
FROM sessions AS s WHERE s.started_at < ?
"""


@dataclass
class PruneResult:
    """What a prune deleted (rows by table), what it kept back, and the file sizes."""

    cutoff: str
    sessions: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    unshipped: int = 0
    bytes_before: int | None = None
    bytes_after: int | None = None

    def __str__(self) -> str:
        if not self.sessions:
            text = f"nothing older than {self.cutoff} to prune"
        else:
            detail = ", ".join(f"{n} {t.replace('_', ' ')}" for t, n in self.rows.items() if n)
            text = f"pruned {self.sessions} sessions older than {self.cutoff}"
            text += f" ({detail})" if detail else ""
        if self.unshipped:
            text += f"; {self.unshipped} old sessions kept until they are shipped"
        if self.bytes_before is not None and self.bytes_after is not None:
            text += f"; database {_mib(self.bytes_before)} -> {_mib(self.bytes_after)}"
        return text


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


#: The youngest age ``--older-than`` takes.
MIN_AGE = timedelta(minutes=1)


def parse_age(text: str, *, option: str = "--older-than") -> timedelta:
    """``30d``, ``2w``, ``12h``, ``90m`` or a plain number of days, at least :data:`MIN_AGE`."""
    m = _AGE.fullmatch(text)
    if not m:
        raise UsageError(f"{option}: {text!r} is not an age like 30d, 2w, 12h or 90m")
    age = timedelta(**{_UNIT[m.group(2).lower()]: float(m.group(1))})
    if age < MIN_AGE:
        raise UsageError(f"{option}: {text!r} is too young: an age is at least 1 minute "
                         "(1m), like 30d, 2w, 12h or 90m")
    return age


def prune(conn: sqlite3.Connection, older_than: datetime,
          only_shipped: ShippedFilter | None = None) -> PruneResult:
    """Delete the sessions whose every label is before ``older_than``, with all their rows,
    in one transaction (see the module docstring for which are kept)."""
    cutoff = format_ts(older_than)
    result = PruneResult(cutoff)
    conn.execute("BEGIN IMMEDIATE")
    try:
        old = {sid for sid, last in conn.execute(_LAST_ACTIVITY, (cutoff,)) if last < cutoff}
        if old and only_shipped is not None:
            shipped = set(only_shipped(conn, sorted(old)))
            result.unshipped = len(old - shipped)
            old &= shipped
        old = _whole_conversations(conn, old)
        conn.execute("PRAGMA defer_foreign_keys = ON")  # a chain may span two chunks
        ids = sorted(old)
        for table in (*_TABLES, "sessions"):
            column = "id" if table == "sessions" else "session_id"
            n = 0
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                n += conn.execute(f"DELETE FROM {table} WHERE {column} IN"
                                  f" ({', '.join('?' * len(chunk))})", chunk).rowcount
            if table == "sessions":
                result.sessions = n
            else:
                result.rows[table] = n
        if only_shipped is None:
            result.rows["errors"] += conn.execute(
                "DELETE FROM errors WHERE session_id IS NULL AND at < ?", (cutoff,)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _whole_conversations(conn: sqlite3.Connection, old: set[str]) -> set[str]:
    """The sessions of ``old`` whose whole conversation (the sessions linked to them by
    ``previous_session_id``, either way, transitively) is in ``old``."""
    if not old:
        return old
    parent: dict[str, str] = {}

    def root(sid: str) -> str:
        while parent.get(sid, sid) != sid:
            sid = parent[sid]
        return sid

    linked: set[str] = set()
    for sid, previous in conn.execute("SELECT id, previous_session_id FROM sessions"
                                      " WHERE previous_session_id IS NOT NULL"):
        linked.update((sid, previous))
        a, b = root(sid), root(previous)
        if a != b:
            parent[a] = b
    members: dict[str, set[str]] = {}
    for sid in linked:
        members.setdefault(root(sid), set()).add(sid)
    return {sid for sid in old if members.get(root(sid), {sid}) <= old}


def shrink(conn: sqlite3.Connection, *, convert: bool = False) -> None:
    """Give free pages back to the filesystem: the memory's full-text index drops what the
    prune deleted (FTS5 keeps deletions as markers until its segments merge: ``convert``, by
    hand, merges them all; otherwise a bounded step, so ``run``'s hourly prune holds the write
    lock briefly), then an incremental vacuum and a passive checkpoint. A database without
    auto-vacuum is converted with one ``VACUUM`` when ``convert``."""
    if convert:
        conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('optimize')")
    else:
        conn.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('merge', ?)",
                     (INDEX_MERGE_PAGES,))
    mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    if mode == 2:
        # executescript steps the pragma to the end (execute() frees a single page)
        conn.executescript("PRAGMA incremental_vacuum;")
    elif convert:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def prune_and_shrink(conn: sqlite3.Connection, older_than: datetime,
                     only_shipped: ShippedFilter | None = None, *,
                     convert: bool = False) -> PruneResult:
    """:func:`prune`, then :func:`shrink` when something was deleted (or ``convert``)."""
    result = prune(conn, older_than, only_shipped)
    if result.sessions or convert:
        shrink(conn, convert=convert)
    return result


def prune_command(db_path: str | os.PathLike[str], *, older_than: str | None = None,
                  retention_days: float | None = None,
                  only_shipped: ShippedFilter | None = None, now: WallClock = utc_now,
                  out: TextIO | None = None) -> PruneResult:
    """The ``prune`` command: delete conversations older than ``older_than`` (``30d``; else
    ``retention_days``), shrink the file (converting an old one to incremental auto-vacuum
    once) and print one line. A missing database is a :class:`UsageError`."""
    if older_than is not None:
        age = parse_age(older_than)
    elif retention_days is not None and retention_days > 0:
        age = timedelta(days=retention_days)
    else:
        raise UsageError("prune: say how old: --older-than AGE (e.g. 30d) or"
                         " R2D2_RETENTION_DAYS")
    path = os.fspath(db_path)
    if not os.path.exists(path):
        raise UsageError(f"no such database: {path}")
    before = _size(path)
    with Store.open(path, now=now) as store:
        result = prune(store.conn, now() - age, only_shipped)
        try:
            shrink(store.conn, convert=True)
        except sqlite3.Error as exc:
            if not is_transient(exc):
                raise
            (out or sys.stdout).write(f"{result}\n")
            raise RuntimeFailure(f"{path}: pruned, but not compacted: {describe(exc)}") from None
    result.bytes_before, result.bytes_after = before, _size(path)
    (out or sys.stdout).write(f"{result}\n")
    return result


def _size(path: str) -> int:
    return os.path.getsize(path)  # the WAL beside it is cut back to WAL_SIZE_LIMIT
