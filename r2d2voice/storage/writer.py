"""Every write to the database. The writer stamps the wall-clock labels itself, from its
injected ``now``: ``sessions.started_at`` / ``ended_at``, ``messages.created_at`` (first insert,
kept on update), ``responses.created_at`` (first insert) and ``done_at`` (first final status),
``errors.at``. Order never comes from them: ``sessions.seq`` is assigned here (max + 1, inside
the write transaction) and ``messages.seq`` comes from the protocol core.

Each write commits at once unless it runs inside ``with writer.batch():``, which commits once
at the end. ``with writer.labels_at(when):`` stamps ``when`` instead of ``now()`` (the recorder
stamps a record when it is recorded, even if the disk lets it be written only later).

Privacy mode (``store_text=False``): messages keep their ids, order, interruption and
responses, but ``text`` is stored empty and ``raw_event`` NULL, with ``text_kept = 0``;
tool executions keep no arguments nor output (see :mod:`r2d2voice.storage.tool_audit`).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from r2d2voice.storage.schema import ERROR_SOURCES, ROLES
from r2d2voice.storage.timestamps import WallClock, format_ts, utc_now
from r2d2voice.storage.tool_audit import ToolWrites

__all__ = ["LOCAL", "Writer", "new_session_id"]

#: The backend name of local-backend sessions, and the model the local backend names in every
#: ``session.created`` (``localbackend.session_config.LOCAL_MODEL``): a session whose service
#: says it is ``local`` is recorded as backend ``local`` and never priced, whatever URL
#: reached it.
LOCAL = "local"

_INSERT_SESSION = """
INSERT INTO sessions (id, seq, started_at, backend, model, voice, previous_session_id, metadata)
VALUES (?, (SELECT COALESCE(max(seq), 0) + 1 FROM sessions), ?, ?, ?, ?, ?, ?)
"""

_UPSERT_MESSAGE = """
INSERT INTO messages (session_id, seq, role, text, created_at, item_id, response_id, raw_event,
                      text_kept)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, item_id, role) DO UPDATE SET
    text        = excluded.text,
    response_id = COALESCE(excluded.response_id, messages.response_id),
    raw_event   = CASE WHEN excluded.text_kept
                       THEN COALESCE(excluded.raw_event, messages.raw_event) END,
    text_kept   = excluded.text_kept
"""

_MARK_INTERRUPTED = """
INSERT INTO messages (session_id, seq, role, text, created_at, item_id, interrupted, played_ms,
                      text_kept)
VALUES (?, ?, 'assistant', '', ?, ?, 1, ?, ?)
ON CONFLICT (session_id, item_id, role) DO UPDATE SET
    interrupted = 1,
    played_ms   = excluded.played_ms
"""

_UPSERT_RESPONSE = """
INSERT INTO responses (session_id, response_id, status, created_at, done_at,
                       input_text_tokens, input_audio_tokens, input_cached_tokens,
                       output_text_tokens, output_audio_tokens, status_details, first_audio_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, response_id) DO UPDATE SET
    status              = excluded.status,
    done_at             = COALESCE(responses.done_at, excluded.done_at),
    input_text_tokens   = COALESCE(excluded.input_text_tokens, responses.input_text_tokens),
    input_audio_tokens  = COALESCE(excluded.input_audio_tokens, responses.input_audio_tokens),
    input_cached_tokens = COALESCE(excluded.input_cached_tokens, responses.input_cached_tokens),
    output_text_tokens  = COALESCE(excluded.output_text_tokens, responses.output_text_tokens),
    output_audio_tokens = COALESCE(excluded.output_audio_tokens, responses.output_audio_tokens),
    status_details      = COALESCE(excluded.status_details, responses.status_details),
    first_audio_ms      = COALESCE(excluded.first_audio_ms, responses.first_audio_ms)
"""

_SET_LATENCY = """
INSERT INTO responses (session_id, response_id, status, created_at, first_audio_ms,
                       first_played_ms)
VALUES (?, ?, 'in_progress', ?, ?, ?)
ON CONFLICT (session_id, response_id) DO UPDATE SET
    first_audio_ms  = COALESCE(excluded.first_audio_ms, responses.first_audio_ms),
    first_played_ms = COALESCE(excluded.first_played_ms, responses.first_played_ms)
"""


def _opt_int(value: Any) -> int | None:
    return None if value is None else round(value)


def usage_columns(usage: dict[str, Any] | None) -> tuple[int | None, ...]:
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


def new_session_id(started: datetime) -> str:
    """A new session id from its start label: ``20261121T093000Z-3f9a1c``."""
    utc = started.replace(tzinfo=timezone.utc) if started.tzinfo is None else started
    return f"{utc.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class Writer(ToolWrites):
    """Writes over one read-write connection; wall-clock labels come from ``now``;
    ``store_text=False`` is privacy mode."""

    def __init__(self, conn: sqlite3.Connection, *, now: WallClock = utc_now,
                 store_text: bool = True) -> None:
        self.conn = conn
        self.now = now
        self.store_text = store_text
        self._batch_depth = 0

    def _stamp(self) -> str:
        return format_ts(self.now())

    @contextmanager
    def labels_at(self, when: datetime) -> Iterator[None]:
        """Stamp ``when`` on everything written inside (instead of ``now()``)."""
        saved = self.now
        self.now = lambda: when
        try:
            yield
        finally:
            self.now = saved

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run several writes in one transaction, committed once at the end.

        An exception rolls the whole batch back. Nested batches join the outer one.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        with self._transaction():
            self._batch_depth = 1
            try:
                yield
            finally:
                self._batch_depth = 0

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        if self._batch_depth:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:  # roll back and re-raise, whatever it is
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- sessions ---------------------------------------------------------------------

    def start_session(self, *, backend: str, model: str, voice: str | None,
                      previous_session_id: str | None = None,
                      metadata: dict[str, Any] | None = None,
                      session_id: str | None = None) -> str:
        """Record a new session, last in order; returns its id (``20261121T093000Z-3f9a1c``).

        ``session_id``: use this id (made earlier with :func:`new_session_id`) instead of a
        new one."""
        started = self.now()
        meta = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
        with self._transaction() as conn:
            sid = session_id
            while sid is None:
                sid = new_session_id(started)
                if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone():
                    sid = None
            conn.execute(_INSERT_SESSION, (sid, format_ts(started), backend, model, voice,
                                           previous_session_id, meta))
        return sid

    def set_service_session_id(self, session_id: str, *, service_session_id: str,
                               model: str | None = None) -> None:
        """Remember the Realtime service's own id for this session and, when it names one, the
        model it says it runs (which replaces the one asked for); a service naming the model
        :data:`LOCAL` is the local backend, and the session's backend becomes ``local``."""
        with self._transaction() as conn:
            conn.execute("UPDATE sessions SET service_session_id = ? WHERE id = ?",
                         (service_session_id, session_id))
            if model:
                conn.execute("UPDATE sessions SET model = ?, backend = CASE WHEN ? = ? "
                             "THEN ? ELSE backend END WHERE id = ?",
                             (model, model, LOCAL, LOCAL, session_id))

    def end_session(self, session_id: str) -> None:
        """Stamp the session's end."""
        with self._transaction() as conn:
            conn.execute("UPDATE sessions SET ended_at = ? WHERE id = ?",
                         (self._stamp(), session_id))

    def set_session_stats(self, session_id: str, stats: dict[str, Any]) -> None:
        """Store the pipeline's counters as ``metadata["stats"]``, keeping the other keys.

        Read-modify-write inside one transaction, so no other writer interleaves. Replaces any
        earlier ``stats``; metadata that is not a JSON object is replaced by a new object. An
        unknown session id changes nothing.
        """
        if not isinstance(stats, dict):
            raise TypeError(f"stats must be a dict, not {type(stats).__name__}")
        self._merge_metadata(session_id, {"stats": stats})

    def update_session_metadata(self, session_id: str, values: dict[str, Any]) -> None:
        """Set top-level keys of the session's metadata (facts known only when a session is
        over, e.g. a wake-word conversation's length), keeping the other keys; ``stats`` is
        :meth:`set_session_stats`'s. Read-modify-write in one transaction; an unknown session
        id changes nothing."""
        if "stats" in values:
            raise ValueError("metadata['stats'] is set by set_session_stats")
        self._merge_metadata(session_id, values)

    def _merge_metadata(self, session_id: str, values: dict[str, Any]) -> None:
        """Set top-level metadata keys in one read-modify-write transaction; metadata that is
        not a JSON object is replaced by a new one; an unknown session changes nothing."""
        encoded = json.dumps(values, ensure_ascii=False)  # fails before the transaction
        with self._transaction() as conn:
            row = conn.execute("SELECT metadata FROM sessions WHERE id = ?",
                               (session_id,)).fetchone()
            if row is None:
                return
            try:
                meta = json.loads(row[0]) if row[0] else {}
            except ValueError:
                meta = {}
            meta = {**(meta if isinstance(meta, dict) else {}), **json.loads(encoded)}
            conn.execute("UPDATE sessions SET metadata = ? WHERE id = ?",
                         (json.dumps(meta, ensure_ascii=False), session_id))

    # -- messages ---------------------------------------------------------------------

    def upsert_message(self, session_id: str, *, role: str, item_id: str, seq: int, text: str,
                       response_id: str | None = None, raw_event: str | None = None) -> None:
        """Insert a message, or update the one with the same (session, item_id, role).

        An update replaces the text, and the response id / raw event when given; it keeps the
        first ``seq`` and ``created_at`` and any interruption already recorded. In privacy
        mode the text is stored empty and the raw event not at all.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        kept = self.store_text
        with self._transaction() as conn:
            conn.execute(_UPSERT_MESSAGE, (session_id, int(seq), role, text if kept else "",
                                           self._stamp(), item_id, response_id,
                                           raw_event if kept else None, int(kept)))

    def mark_interrupted(self, session_id: str, *, item_id: str, seq: int,
                         played_ms: int) -> None:
        """Mark an assistant message interrupted after ``played_ms`` of audio.

        If its transcript has not arrived yet, an empty placeholder row is created; the later
        :meth:`upsert_message` fills the text and keeps the interruption.
        """
        with self._transaction() as conn:
            conn.execute(_MARK_INTERRUPTED, (session_id, int(seq), self._stamp(), item_id,
                                             int(played_ms), int(self.store_text)))

    # -- responses --------------------------------------------------------------------

    def record_response(self, session_id: str, *, response_id: str, status: str,
                        usage: dict[str, Any] | None = None,
                        status_details: dict[str, Any] | None = None,
                        first_audio_ms: float | None = None) -> None:
        """Insert or update a response: status, GA ``response.usage`` tokens, the service's
        ``status_details`` (JSON) and the speech-stopped -> first audio latency (ms, measured
        on the monotonic clock by the caller). ``done_at`` is stamped at the first status
        that is not ``in_progress``."""
        now = self._stamp()
        details = None if status_details is None else json.dumps(status_details,
                                                                 ensure_ascii=False)
        with self._transaction() as conn:
            conn.execute(_UPSERT_RESPONSE, (
                session_id, response_id, status, now, None if status == "in_progress" else now,
                *usage_columns(usage), details, _opt_int(first_audio_ms)))

    def set_response_latency(self, session_id: str, *, response_id: str,
                             first_audio_ms: float | None = None,
                             first_played_ms: float | None = None) -> None:
        """Record speech-stopped -> first audio received / played latencies (ms, monotonic)."""
        with self._transaction() as conn:
            conn.execute(_SET_LATENCY, (session_id, response_id, self._stamp(),
                                        _opt_int(first_audio_ms), _opt_int(first_played_ms)))

    # -- errors -----------------------------------------------------------------------

    def record_error(self, session_id: str | None, *, source: str, type: str | None,
                     code: str | None, message: str) -> None:
        """Record an error from the service or from us (``source`` 'service' | 'local')."""
        if source not in ERROR_SOURCES:
            raise ValueError(f"source must be one of {ERROR_SOURCES}, not {source!r}")
        with self._transaction() as conn:
            conn.execute("INSERT INTO errors (session_id, at, source, type, code, message)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (session_id, self._stamp(), source, type, code, message))
