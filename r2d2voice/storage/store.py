"""The durable transcript store: one SQLite file, WAL journal, versioned schema.

Stdlib only and synchronous: the appliance calls a :class:`Store` from a worker thread
(``trio.to_thread.run_sync``) and serialises the calls itself (one ``CapacityLimiter(1)``),
so the connection is opened with ``check_same_thread=False`` and carries no lock of its own.

Timestamps are stored as text in one fixed format, ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC), so
they sort and compare as strings. Every write commits at once unless it runs inside
``with store.batch():``, which commits once at the end.

Schema history (``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as ours):

* v1: sessions, messages (no interruption columns), responses (status and times only), errors.
* v2: ``messages.interrupted`` / ``messages.played_ms``; token usage and latency columns
  on ``responses``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from r2d2voice.errors import UsageError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "ErrorRow",
    "MessageRow",
    "SessionRow",
    "SessionStatsRow",
    "Store",
    "UsageRow",
    "UsageSummaryRow",
    "format_ts",
    "parse_ts",
    "utc_now",
]

#: ``PRAGMA application_id`` of every r2d2voice database (ASCII "r2d2").
APPLICATION_ID = 0x72326432
#: The schema version this code writes; older files are migrated forward on open.
SCHEMA_VERSION = 2

ROLES = ("user", "assistant")
ERROR_SOURCES = ("service", "local")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FETCH = 1000  # rows per fetchmany() when streaming

# ---------------------------------------------------------------------------- time helpers


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def format_ts(dt: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC (naive datetimes are taken as UTC)."""
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def parse_ts(text: str) -> datetime:
    """Inverse of :func:`format_ts`: an aware UTC datetime."""
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def _ts(dt: datetime | None) -> str:
    return format_ts(utc_now() if dt is None else dt)


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class MessageRow:
    """One transcript message, as exported."""

    session_id: str
    role: str
    text: str
    created_at: str
    item_id: str
    response_id: str | None
    interrupted: bool
    played_ms: int | None


@dataclass(frozen=True)
class SessionRow:
    """One session with its message counts (``turns`` = user messages)."""

    id: str
    started_at: str
    ended_at: str | None
    backend: str
    model: str
    voice: str | None
    turns: int
    messages: int
    previous_session_id: str | None
    service_session_id: str | None


@dataclass(frozen=True)
class UsageRow:
    """Token usage summed over one session's responses."""

    session_id: str
    responses: int
    input_text: int
    input_audio: int
    input_cached: int
    output_text: int
    output_audio: int

    @property
    def input_total(self) -> int:
        return self.input_text + self.input_audio

    @property
    def output_total(self) -> int:
        return self.output_text + self.output_audio


@dataclass(frozen=True)
class UsageSummaryRow:
    """Token usage summed over the responses of one group (a UTC day, or a session).

    ``input_cached`` is part of ``input_text + input_audio``. The store keeps only the cached
    total, so ``cached_text_est`` / ``cached_audio_est`` split it per response in proportion to
    that response's text and audio input (an estimate, used for pricing).
    """

    key: str
    responses: int
    input_text: int
    input_audio: int
    input_cached: int
    output_text: int
    output_audio: int
    cached_text_est: float
    cached_audio_est: float


@dataclass(frozen=True)
class SessionStatsRow:
    """One session's pipeline counters (``metadata["stats"]``; None when not recorded)."""

    session_id: str
    started_at: str
    previous_session_id: str | None
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class ErrorRow:
    """One recorded error."""

    session_id: str | None
    at: str
    source: str
    type: str | None
    code: str | None
    message: str


# ---------------------------------------------------------------------------- schema

_SCHEMA_V2 = f"""
CREATE TABLE sessions (
    id                  TEXT NOT NULL PRIMARY KEY,
    started_at          TEXT NOT NULL,
    ended_at            TEXT,
    backend             TEXT NOT NULL,
    model               TEXT NOT NULL,
    voice               TEXT,
    service_session_id  TEXT,
    previous_session_id TEXT REFERENCES sessions(id),
    metadata            TEXT            -- JSON object
);
-- UNIQUE + NOT NULL id: lets SQLite stream sessions-then-messages order with no sort.
CREATE UNIQUE INDEX sessions_by_start ON sessions(started_at, id);

CREATE TABLE messages (
    id          INTEGER PRIMARY KEY,    -- rowid: tie-break for equal created_at
    session_id  TEXT NOT NULL REFERENCES sessions(id),
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text        TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    response_id TEXT,
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
    played_ms   INTEGER,                -- audio played before the interruption
    raw_event   TEXT,                   -- the server event JSON the text came from
    UNIQUE (session_id, item_id, role)
);
CREATE INDEX messages_by_time ON messages(session_id, created_at);

CREATE TABLE responses (
    session_id          TEXT NOT NULL REFERENCES sessions(id),
    response_id         TEXT NOT NULL,
    status              TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    done_at             TEXT,
    input_text_tokens   INTEGER,
    input_audio_tokens  INTEGER,
    input_cached_tokens INTEGER,
    output_text_tokens  INTEGER,
    output_audio_tokens INTEGER,
    first_audio_ms      INTEGER,        -- speech stopped -> first audio received
    first_played_ms     INTEGER,        -- speech stopped -> first audio played
    PRIMARY KEY (session_id, response_id)
);

CREATE TABLE errors (
    id         INTEGER PRIMARY KEY,
    session_id TEXT REFERENCES sessions(id),
    at         TEXT NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('service', 'local')),
    type       TEXT,
    code       TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX errors_by_session ON errors(session_id, at);

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


#: ``MIGRATIONS[n]`` upgrades a version-n database to version n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2}

# ---------------------------------------------------------------------------- queries

_MESSAGE_COLUMNS = (
    "m.session_id, m.role, m.text, m.created_at, m.item_id, m.response_id,"
    " m.interrupted, m.played_ms"
)

# Pinned plan: walk sessions in (started_at, id) order, each one's messages by
# (created_at, rowid) through the index, so rows stream in conversation order with no
# sort (no temp B-tree) whatever the filters.
_ORDERED_JOIN = (
    "sessions AS s INDEXED BY sessions_by_start"
    " CROSS JOIN messages AS m INDEXED BY messages_by_time ON m.session_id = s.id"
)

_UPSERT_MESSAGE = """
INSERT INTO messages (session_id, role, text, created_at, item_id, response_id,
                      interrupted, played_ms, raw_event)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, item_id, role) DO UPDATE SET
    text        = excluded.text,
    response_id = COALESCE(excluded.response_id, messages.response_id),
    raw_event   = COALESCE(excluded.raw_event, messages.raw_event),
    interrupted = MAX(messages.interrupted, excluded.interrupted),
    played_ms   = COALESCE(excluded.played_ms, messages.played_ms)
"""

_MARK_INTERRUPTED = """
INSERT INTO messages (session_id, role, text, created_at, item_id, interrupted, played_ms)
VALUES (?, 'assistant', '', ?, ?, 1, ?)
ON CONFLICT (session_id, item_id, role) DO UPDATE SET
    interrupted = 1,
    played_ms   = excluded.played_ms
"""

_UPSERT_RESPONSE = """
INSERT INTO responses (session_id, response_id, status, created_at, done_at,
                       input_text_tokens, input_audio_tokens, input_cached_tokens,
                       output_text_tokens, output_audio_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, response_id) DO UPDATE SET
    status              = excluded.status,
    done_at             = COALESCE(excluded.done_at, responses.done_at),
    input_text_tokens   = COALESCE(excluded.input_text_tokens, responses.input_text_tokens),
    input_audio_tokens  = COALESCE(excluded.input_audio_tokens, responses.input_audio_tokens),
    input_cached_tokens = COALESCE(excluded.input_cached_tokens, responses.input_cached_tokens),
    output_text_tokens  = COALESCE(excluded.output_text_tokens, responses.output_text_tokens),
    output_audio_tokens = COALESCE(excluded.output_audio_tokens, responses.output_audio_tokens)
"""

_SESSION_SELECT = """
SELECT s.id, s.started_at, s.ended_at, s.backend, s.model, s.voice,
       (SELECT count(*) FROM messages WHERE session_id = s.id AND role = 'user'),
       (SELECT count(*) FROM messages WHERE session_id = s.id),
       s.previous_session_id, s.service_session_id
FROM sessions AS s
"""


# Per response: token columns with NULL as 0, and the cached total split between text and
# audio in proportion to the response's own text/audio input (capped at that input).
_USAGE_PER_RESPONSE = """
SELECT r.session_id, r.created_at, it, ia, ic, ot, oa,
       CASE WHEN it + ia > 0 THEN min(ic, it + ia) * 1.0 * it / (it + ia) ELSE 0.0 END AS ct,
       CASE WHEN it + ia > 0 THEN min(ic, it + ia) * 1.0 * ia / (it + ia) ELSE 0.0 END AS ca
FROM (SELECT session_id, created_at,
             COALESCE(input_text_tokens, 0) AS it, COALESCE(input_audio_tokens, 0) AS ia,
             COALESCE(input_cached_tokens, 0) AS ic, COALESCE(output_text_tokens, 0) AS ot,
             COALESCE(output_audio_tokens, 0) AS oa
      FROM responses) AS r
"""


def _where(
    session_col: str,
    time_col: str,
    sessions: Sequence[str],
    since: datetime | None,
    until: datetime | None,
) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or "") and its arguments: session ids, ``since`` <= time < ``until``."""
    where: list[str] = []
    args: list[Any] = []
    if sessions:
        where.append(f"{session_col} IN ({', '.join('?' * len(sessions))})")
        args.extend(sessions)
    if since is not None:
        where.append(f"{time_col} >= ?")
        args.append(format_ts(since))
    if until is not None:
        where.append(f"{time_col} < ?")
        args.append(format_ts(until))
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _message_row(r: tuple[Any, ...]) -> MessageRow:
    return MessageRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7])


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _usage_columns(usage: dict[str, Any] | None) -> tuple[int | None, ...]:
    """The five token columns from a GA ``response.usage`` object."""
    if not usage:
        return (None,) * 5
    inp = usage.get("input_token_details") or {}
    out = usage.get("output_token_details") or {}
    return (
        _opt_int(inp.get("text_tokens")),
        _opt_int(inp.get("audio_tokens")),
        _opt_int(inp.get("cached_tokens")),
        _opt_int(out.get("text_tokens")),
        _opt_int(out.get("audio_tokens")),
    )


def _new_session_id(started_at: datetime) -> str:
    dt = started_at.replace(tzinfo=timezone.utc) if started_at.tzinfo is None else started_at
    dt = dt.astimezone(timezone.utc)
    return f"{dt:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    # The umask is process-wide: other threads creating files meanwhile get *tighter*
    # permissions, never looser. Only held while opening.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- the store


class Store:
    """One SQLite connection to an r2d2voice database. Use :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.readonly = readonly
        self._batch_depth = 0

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Store:
        """Open (and with ``create``, create or migrate) the database at ``path``.

        ``create=True``: missing directories are made 0700, a missing file 0600, the schema
        is created or migrated forward. ``create=False``: read-only; nothing is created or
        changed, and a missing or foreign file raises :class:`UsageError`.
        """
        spath = os.fspath(path)
        conn = cls._connect_create(spath) if create else cls._connect_readonly(spath)
        try:
            cls._prepare(conn, spath, readonly=not create)
        except BaseException:
            conn.close()
            raise
        return cls(conn, spath, readonly=not create)

    @staticmethod
    def _check_header(fd: int, path: str, *, allow_empty: bool) -> None:
        head = os.pread(fd, len(_SQLITE_MAGIC), 0)
        if head == _SQLITE_MAGIC or (allow_empty and head == b""):
            return
        raise UsageError(f"{path} is not an r2d2voice database")

    @classmethod
    def _connect_create(cls, path: str) -> sqlite3.Connection:
        try:
            with _umask(0o077):
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    cls._check_header(fd, path, allow_empty=True)
                finally:
                    os.close(fd)
                # SQLite gives -wal/-shm the main file's mode; the umask covers the rest.
                return sqlite3.connect(
                    path, check_same_thread=False, isolation_level=None, timeout=10.0
                )
        except OSError as exc:
            raise UsageError(f"cannot open database {path}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open database {path}: {exc}") from exc

    @classmethod
    def _connect_readonly(cls, path: str) -> sqlite3.Connection:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise UsageError(f"no such database: {path}") from None
        except OSError as exc:
            raise UsageError(f"cannot open database {path}: {exc.strerror or exc}") from exc
        try:
            cls._check_header(fd, path, allow_empty=False)
        finally:
            os.close(fd)
        uri = Path(os.path.abspath(path)).as_uri()
        # A read-only connection to a WAL database creates -wal/-shm and cannot remove
        # them at close. When no -wal exists (no writer around), open read-write with
        # query_only on, so SQLite deletes the side files it made; otherwise (or when we
        # may not write the file) open mode=ro, which still sees the writer's WAL.
        modes = ["ro"] if os.path.exists(path + "-wal") else ["rw", "ro"]
        for mode in modes:
            try:
                conn = sqlite3.connect(
                    f"{uri}?mode={mode}",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=10.0,
                )
                conn.execute("PRAGMA query_only = ON")
                return conn
            except sqlite3.Error as exc:
                error = exc
        raise UsageError(f"cannot open database {path}: {error}")

    @staticmethod
    def _probe(conn: sqlite3.Connection) -> tuple[int, int, bool]:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        return app_id, version, empty

    @classmethod
    def _prepare(cls, conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
        foreign = UsageError(f"{path} is not an r2d2voice database")
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            app_id, version, empty = cls._probe(conn)
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
            conn.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if version == SCHEMA_VERSION:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created or migrated it while we waited.
                app_id, version, empty = cls._probe(conn)
                if empty and app_id == 0 and version == 0:
                    for stmt in _split_sql(_SCHEMA_V2):
                        conn.execute(stmt)
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
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{path} is not a usable r2d2voice database: {exc}") from exc

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        """The underlying connection (for benches and tests)."""
        if self._conn is None:
            raise RuntimeError("store is closed")
        return self._conn

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run several writes in one transaction, committed once at the end.

        An exception rolls the whole batch back. Nested batches join the outer one.
        """
        conn = self._writable()
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE")
        self._batch_depth = 1
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            self._batch_depth = 0

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._writable()
        if self._batch_depth:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _writable(self) -> sqlite3.Connection:
        if self.readonly:
            raise RuntimeError(f"{self.path} was opened read-only (create=False)")
        return self.conn

    # -- writes -----------------------------------------------------------------------

    def start_session(
        self,
        *,
        backend: str,
        model: str,
        voice: str | None,
        previous_session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        started_at: datetime | None = None,
    ) -> str:
        """Record a new session; returns its id (``20261121T093000Z-3f9a1c``)."""
        started = utc_now() if started_at is None else started_at
        meta = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
        with self._write() as conn:
            while True:
                sid = _new_session_id(started)
                if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is None:
                    break
            conn.execute(
                "INSERT INTO sessions (id, started_at, backend, model, voice,"
                " previous_session_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sid, format_ts(started), backend, model, voice, previous_session_id, meta),
            )
        return sid

    def set_service_session_id(self, session_id: str, service_session_id: str) -> None:
        """Remember the Realtime service's own id for this session."""
        with self._write() as conn:
            conn.execute(
                "UPDATE sessions SET service_session_id = ? WHERE id = ?",
                (service_session_id, session_id),
            )

    def end_session(self, session_id: str, ended_at: datetime | None = None) -> None:
        """Mark the session ended (now, by default)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE sessions SET ended_at = ? WHERE id = ?", (_ts(ended_at), session_id)
            )

    def upsert_message(
        self,
        session_id: str,
        *,
        role: str,
        item_id: str,
        text: str,
        response_id: str | None = None,
        interrupted: bool = False,
        played_ms: int | None = None,
        raw_event: str | None = None,
        created_at: datetime | None = None,
    ) -> None:
        """Insert a message, or update the one with the same (session, item_id, role).

        An update replaces the text, and the response id / raw event when given; it keeps
        the original ``created_at`` and any interruption already recorded.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        with self._write() as conn:
            conn.execute(
                _UPSERT_MESSAGE,
                (
                    session_id,
                    role,
                    text,
                    _ts(created_at),
                    item_id,
                    response_id,
                    1 if interrupted else 0,
                    _opt_int(played_ms),
                    raw_event,
                ),
            )

    def mark_interrupted(
        self,
        session_id: str,
        item_id: str,
        played_ms: int,
        *,
        created_at: datetime | None = None,
    ) -> None:
        """Mark an assistant message interrupted after ``played_ms`` of audio.

        If its transcript has not arrived yet, an empty placeholder row is created; the
        later :meth:`upsert_message` fills the text and keeps the interruption.
        """
        with self._write() as conn:
            conn.execute(
                _MARK_INTERRUPTED, (session_id, _ts(created_at), item_id, int(played_ms))
            )

    def record_response(
        self,
        session_id: str,
        response_id: str,
        *,
        status: str,
        usage: dict[str, Any] | None = None,
        created_at: datetime | None = None,
        done_at: datetime | None = None,
    ) -> None:
        """Insert or update a response: status, times, and GA ``response.usage`` tokens.

        ``done_at`` defaults to now once ``status`` is no longer ``in_progress``.
        """
        done = done_at
        if done is None and status != "in_progress":
            done = utc_now()
        with self._write() as conn:
            conn.execute(
                _UPSERT_RESPONSE,
                (
                    session_id,
                    response_id,
                    status,
                    _ts(created_at),
                    None if done is None else format_ts(done),
                    *_usage_columns(usage),
                ),
            )

    def set_response_latency(
        self,
        session_id: str,
        response_id: str,
        *,
        first_audio_ms: int | None = None,
        first_played_ms: int | None = None,
    ) -> None:
        """Record speech-stopped -> first audio received / played latencies."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO responses (session_id, response_id, status, created_at,"
                " first_audio_ms, first_played_ms) VALUES (?, ?, 'in_progress', ?, ?, ?)"
                " ON CONFLICT (session_id, response_id) DO UPDATE SET"
                " first_audio_ms = COALESCE(excluded.first_audio_ms, responses.first_audio_ms),"
                " first_played_ms = COALESCE(excluded.first_played_ms, responses.first_played_ms)",
                (
                    session_id,
                    response_id,
                    _ts(None),
                    _opt_int(first_audio_ms),
                    _opt_int(first_played_ms),
                ),
            )

    def set_session_stats(self, session_id: str, stats: dict[str, Any]) -> None:
        """Store the pipeline's counters as ``metadata["stats"]``, keeping the other keys.

        Read-modify-write inside one ``BEGIN IMMEDIATE`` transaction, so no other writer
        interleaves. Replaces any earlier ``stats``; metadata that is not a JSON object is
        replaced by a new object. An unknown session id changes nothing.
        """
        if not isinstance(stats, dict):
            raise TypeError(f"stats must be a dict, not {type(stats).__name__}")
        encoded = json.dumps(stats, ensure_ascii=False)  # fails before the transaction
        with self._write() as conn:
            row = conn.execute(
                "SELECT metadata FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None:
                return
            try:
                meta = json.loads(row[0]) if row[0] else {}
            except ValueError:
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
            meta["stats"] = json.loads(encoded)
            conn.execute(
                "UPDATE sessions SET metadata = ? WHERE id = ?",
                (json.dumps(meta, ensure_ascii=False), session_id),
            )

    def record_error(
        self,
        session_id: str | None,
        *,
        source: str,
        type: str | None,
        code: str | None,
        message: str,
        at: datetime | None = None,
    ) -> None:
        """Record an error from the service or from us (``source`` 'service' | 'local')."""
        if source not in ERROR_SOURCES:
            raise ValueError(f"source must be one of {ERROR_SOURCES}, not {source!r}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO errors (session_id, at, source, type, code, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, _ts(at), source, type, code, message),
            )

    # -- reads ------------------------------------------------------------------------

    def iter_messages(
        self,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        role: str | None = None,
    ) -> Iterator[MessageRow]:
        """Stream messages in conversation order (sessions by start, then by time).

        ``since`` is inclusive and ``until`` exclusive; ``sessions`` empty means all.
        """
        where: list[str] = []
        args: list[Any] = []
        if sessions:
            where.append(f"s.id IN ({', '.join('?' * len(sessions))})")
            args.extend(sessions)
        if since is not None:
            where.append("m.created_at >= ?")
            args.append(format_ts(since))
        if until is not None:
            where.append("m.created_at < ?")
            args.append(format_ts(until))
        if role is not None:
            if role not in ROLES:
                raise ValueError(f"role must be one of {ROLES}, not {role!r}")
            where.append("m.role = ?")
            args.append(role)
        sql = (
            f"SELECT {_MESSAGE_COLUMNS} FROM {_ORDERED_JOIN}"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY s.started_at, s.id, m.created_at, m.id"
        )
        cur = self.conn.execute(sql, args)
        try:
            while rows := cur.fetchmany(_FETCH):
                for r in rows:
                    yield _message_row(r)
        finally:
            cur.close()

    def get_session(self, session_id: str) -> SessionRow | None:
        """One session, or None."""
        r = self.conn.execute(_SESSION_SELECT + " WHERE s.id = ?", (session_id,)).fetchone()
        return None if r is None else SessionRow(*r)

    def list_sessions(self) -> list[SessionRow]:
        """All sessions, oldest first."""
        rows = self.conn.execute(_SESSION_SELECT + " ORDER BY s.started_at, s.id").fetchall()
        return [SessionRow(*r) for r in rows]

    def recent_turns(self, session_ids: Sequence[str] | None, limit: int) -> list[tuple[str, str]]:
        """``(role, text)`` of the last ``limit`` non-empty messages, oldest first.

        ``session_ids`` None (or empty) means every session.
        """
        if limit <= 0:
            return []
        args: list[Any] = []
        where = "m.text != ''"
        if session_ids:
            where += f" AND s.id IN ({', '.join('?' * len(session_ids))})"
            args.extend(session_ids)
        rows = self.conn.execute(
            f"SELECT m.role, m.text FROM {_ORDERED_JOIN}"
            f" WHERE {where}"
            " ORDER BY s.started_at DESC, s.id DESC, m.created_at DESC, m.id DESC LIMIT ?",
            [*args, limit],
        ).fetchall()
        rows.reverse()
        return [(role, text) for role, text in rows]

    def usage_totals(self, sessions: Sequence[str] = ()) -> list[UsageRow]:
        """Token usage summed per session (all sessions by default), oldest first."""
        where = ""
        if sessions:
            where = f" WHERE s.id IN ({', '.join('?' * len(sessions))})"
        rows = self.conn.execute(
            "SELECT s.id, count(r.response_id),"
            " COALESCE(sum(r.input_text_tokens), 0), COALESCE(sum(r.input_audio_tokens), 0),"
            " COALESCE(sum(r.input_cached_tokens), 0), COALESCE(sum(r.output_text_tokens), 0),"
            " COALESCE(sum(r.output_audio_tokens), 0)"
            " FROM sessions AS s LEFT JOIN responses AS r ON r.session_id = s.id"
            f"{where} GROUP BY s.id ORDER BY s.started_at, s.id",
            list(sessions),
        ).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage_summary(
        self,
        by: str,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageSummaryRow]:
        """Token usage of the responses created in [``since``, ``until``), grouped ``by``
        ``"day"`` (UTC date of ``responses.created_at``, oldest first) or ``"session"``
        (sessions by start). Groups without responses are left out."""
        if by == "day":
            key, join, order = "substr(r.created_at, 1, 10)", "", "1"
        elif by == "session":
            key, join = "r.session_id", " JOIN sessions AS s ON s.id = r.session_id"
            order = "s.started_at, s.id"
        else:
            raise ValueError(f"by must be 'day' or 'session', not {by!r}")
        where, args = _where("r.session_id", "r.created_at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT {key}, count(*), sum(r.it), sum(r.ia), sum(r.ic), sum(r.ot), sum(r.oa),"
            f" sum(r.ct), sum(r.ca) FROM ({_USAGE_PER_RESPONSE}) AS r{join}{where}"
            f" GROUP BY {key} ORDER BY {order}",
            args,
        ).fetchall()
        return [UsageSummaryRow(*r) for r in rows]

    def response_latencies(
        self,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> tuple[list[int], list[int]]:
        """Sorted ``first_audio_ms`` and ``first_played_ms`` values (NULLs left out) of the
        responses created in [``since``, ``until``)."""
        where, args = _where("session_id", "created_at", sessions, since, until)
        out: list[list[int]] = []
        for col in ("first_audio_ms", "first_played_ms"):
            cond = f"{where} AND {col} IS NOT NULL" if where else f" WHERE {col} IS NOT NULL"
            rows = self.conn.execute(
                f"SELECT {col} FROM responses{cond} ORDER BY {col}", args
            ).fetchall()
            out.append([int(r[0]) for r in rows])
        return out[0], out[1]

    def response_status_counts(
        self,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, int]:
        """Responses created in [``since``, ``until``) counted by status (by name)."""
        where, args = _where("session_id", "created_at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT status, count(*) FROM responses{where} GROUP BY status ORDER BY status",
            args,
        ).fetchall()
        return {status: n for status, n in rows}

    def count_interrupted(
        self,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """Messages created in [``since``, ``until``) marked interrupted (cut-off replies)."""
        where, args = _where("session_id", "created_at", sessions, since, until)
        cond = f"{where} AND interrupted = 1" if where else " WHERE interrupted = 1"
        return int(self.conn.execute(f"SELECT count(*) FROM messages{cond}", args).fetchone()[0])

    def count_errors(
        self,
        *,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, int]:
        """Recorded errors in [``since``, ``until``) by source (``service`` / ``local``).

        With ``sessions``, errors not tied to a session are left out."""
        where, args = _where("session_id", "at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT source, count(*) FROM errors{where} GROUP BY source", args
        ).fetchall()
        counts = dict.fromkeys(ERROR_SOURCES, 0)
        counts.update({source: n for source, n in rows})
        return counts

    def session_stats(
        self,
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[SessionStatsRow]:
        """Sessions started in [``since``, ``until``) with their ``metadata["stats"]``
        object (None when absent or unreadable), oldest first."""
        where, args = _where("id", "started_at", sessions, since, until)
        rows = self.conn.execute(
            "SELECT id, started_at, previous_session_id, metadata FROM sessions"
            f"{where} ORDER BY started_at, id",
            args,
        ).fetchall()
        out = []
        for sid, started, previous, meta in rows:
            stats = None
            try:
                loaded = json.loads(meta) if meta else None
            except ValueError:
                loaded = None
            if isinstance(loaded, dict) and isinstance(loaded.get("stats"), dict):
                stats = loaded["stats"]
            out.append(SessionStatsRow(sid, started, previous, stats))
        return out

    def list_errors(self, session_id: str | None = None) -> list[ErrorRow]:
        """Recorded errors (of one session, or all), oldest first."""
        sql = "SELECT session_id, at, source, type, code, message FROM errors"
        args: tuple[Any, ...] = ()
        if session_id is not None:
            sql += " WHERE session_id = ?"
            args = (session_id,)
        rows = self.conn.execute(sql + " ORDER BY at, id", args).fetchall()
        return [ErrorRow(*r) for r in rows]


def _split_sql(script: str) -> list[str]:
    """Statements of a schema script (no ';' inside literals), comments stripped."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
