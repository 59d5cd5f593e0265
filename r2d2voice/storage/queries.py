"""Read queries and the rows they return.

Conversation order is ``sessions.seq`` then ``messages.seq`` (then the rowid); tool
executions share the messages' sequence. Wall-clock labels only filter (``since`` inclusive,
``until`` exclusive, as the user asked for them).
"""

from __future__ import annotations

import heapq
import json
import sqlite3
import weakref
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from r2d2voice.storage.schema import ERROR_SOURCES, ROLES
from r2d2voice.storage.timestamps import format_ts

__all__ = [
    "EXPORT_ROLES",
    "WAKE_KEYS",
    "ErrorRow",
    "MessageRow",
    "Queries",
    "SessionRow",
    "SessionStatsRow",
    "TokenTotals",
    "ToolRow",
    "UsageRow",
    "UsageSummaryRow",
    "wake_facts",
]

_FETCH = 1000  # rows per fetchmany() when streaming

# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class MessageRow:
    """One transcript message, as exported."""

    session_id: str
    seq: int
    role: str
    text: str
    created_at: str
    item_id: str
    response_id: str | None
    interrupted: bool
    played_ms: int | None
    #: False: written in privacy mode, ``text`` is empty
    text_kept: bool = True


@dataclass(frozen=True)
class ToolRow:
    """One tool execution (``role`` "tool"), in conversation order among the messages.

    ``status`` is ``running`` until a result is stored; ``text_kept`` False: privacy mode, no
    arguments nor output were stored."""

    session_id: str
    seq: int
    started_at: str
    item_id: str | None
    response_id: str | None
    call_id: str
    name: str
    arguments: str | None
    output: str | None
    status: str
    exit_code: int | None
    duration_ms: int | None
    text_kept: bool = True

    @property
    def role(self) -> str:
        return "tool"

    @property
    def created_at(self) -> str:
        return self.started_at


@dataclass(frozen=True)
class SessionRow:
    """One session with its message counts (``turns`` = user messages)."""

    id: str
    seq: int
    started_at: str
    ended_at: str | None
    backend: str
    model: str
    voice: str | None
    turns: int
    messages: int
    previous_session_id: str | None
    service_session_id: str | None


class TokenTotals:
    """``input_total`` and ``output_total`` of a usage row (local or fleet)."""

    input_text: int
    input_audio: int
    output_text: int
    output_audio: int

    @property
    def input_total(self) -> int:
        return self.input_text + self.input_audio

    @property
    def output_total(self) -> int:
        return self.output_text + self.output_audio


@dataclass(frozen=True)
class UsageRow(TokenTotals):
    """Token usage summed over one session's responses."""

    session_id: str
    responses: int
    input_text: int
    input_audio: int
    input_cached: int
    output_text: int
    output_audio: int


@dataclass(frozen=True)
class UsageSummaryRow:
    """Token usage summed over the responses of one group (a UTC day, or a session).

    ``input_cached`` is part of ``input_text + input_audio``. The store keeps only the cached
    total, so ``cached_text_est`` / ``cached_audio_est`` split it per response in proportion to
    that response's text and audio input (an estimate, used for pricing).

    ``local``: the responses of sessions on the local backend (``sessions.backend`` or
    ``sessions.model`` "local": the local backend names that model, whichever URL reached
    it), which no service bills; a group with both kinds comes as two rows, the billed one first.
    ``live_seconds``: the billed time of sessions billed by the second (GPT-Live), whose rows
    are not counted in ``responses``.
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
    local: bool = False
    live_seconds: float = 0.0


@dataclass(frozen=True)
class SessionStatsRow:
    """One session's pipeline counters (``metadata["stats"]``; None when not recorded)."""

    session_id: str
    started_at: str
    previous_session_id: str | None
    stats: dict[str, Any] | None
    wake: dict[str, Any] | None = None  # the wake-mode keys, when ``listen`` is "wake"


#: Keys the wake-word mode writes in a session's metadata (read by ``stats``).
WAKE_KEYS = ("wake_source", "wake_word", "wake_score", "wake_at_s", "wake_ready_ms",
             "conversation_s", "conversation_end")


def wake_facts(meta: Any) -> dict[str, Any] | None:
    """A session's wake-mode facts from its metadata object: the :data:`WAKE_KEYS` present,
    or None when the session was not started by a wake (``listen`` is not "wake")."""
    if not isinstance(meta, dict) or meta.get("listen") != "wake":
        return None
    return {k: meta[k] for k in WAKE_KEYS if k in meta}


@dataclass(frozen=True)
class ErrorRow:
    """One recorded error."""

    session_id: str | None
    at: str
    source: str
    type: str | None
    code: str | None
    message: str


# ---------------------------------------------------------------------------- SQL

_MESSAGE_COLUMNS = (
    "m.session_id, m.seq, m.role, m.text, m.created_at, m.item_id, m.response_id,"
    " m.interrupted, m.played_ms, m.text_kept"
)
_TOOL_COLUMNS = (
    "t.session_id, t.seq, t.started_at, t.item_id, t.response_id, t.call_id, t.name,"
    " t.arguments, t.output, t.status, t.exit_code, t.duration_ms, t.text_kept"
)

# Pinned plan: walk sessions by seq (unique, not null), each one's messages by (seq, rowid)
# through the index, so rows stream in conversation order with no sort (no temp B-tree)
# whatever the filters.
_ORDERED_JOIN = (
    "sessions AS s INDEXED BY sessions_by_seq"
    " CROSS JOIN messages AS m INDEXED BY messages_by_seq ON m.session_id = s.id"
)
_ORDERED_TOOLS = (
    "sessions AS s INDEXED BY sessions_by_seq"
    " CROSS JOIN tool_executions AS t INDEXED BY tool_executions_by_seq ON t.session_id = s.id"
)
#: ``export --role`` values: the message roles and "tool"
EXPORT_ROLES = (*ROLES, "tool")

_SESSION_SELECT = """
SELECT s.id, s.seq, s.started_at, s.ended_at, s.backend, s.model, s.voice,
       (SELECT count(*) FROM messages WHERE session_id = s.id AND role = 'user'),
       (SELECT count(*) FROM messages WHERE session_id = s.id),
       s.previous_session_id, s.service_session_id
FROM sessions AS s
"""

# Per response: token columns with NULL as 0, and the cached total split between text and
# audio in proportion to the response's own text/audio input (capped at that input).
#: A session billed by the second (GPT-Live) keeps its billed time in a ``responses`` row of its
#: own (see ``storage.recorder.billed_row``): this is that time (NULL on any other row).
BILLED_SECONDS = ("CASE WHEN json_valid(status_details)"
                  " THEN json_extract(status_details, '$.billed_seconds') END")
#: A session no service bills: on the local backend, or at a service that says it is one.
_IS_LOCAL = "(s.backend IS 'local' OR s.model IS 'local')"

_USAGE_PER_RESPONSE = f"""
SELECT r.session_id, r.created_at, it, ia, ic, ot, oa,
       CASE WHEN it + ia > 0 THEN min(ic, it + ia) * 1.0 * it / (it + ia) ELSE 0.0 END AS ct,
       CASE WHEN it + ia > 0 THEN min(ic, it + ia) * 1.0 * ia / (it + ia) ELSE 0.0 END AS ca,
       billed
FROM (SELECT session_id, created_at,
             COALESCE(input_text_tokens, 0) AS it, COALESCE(input_audio_tokens, 0) AS ia,
             COALESCE(input_cached_tokens, 0) AS ic, COALESCE(output_text_tokens, 0) AS ot,
             COALESCE(output_audio_tokens, 0) AS oa, {BILLED_SECONDS} AS billed
      FROM responses) AS r
"""


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join('?' * len(values))})"


def _where(session_col: str, time_col: str, sessions: Sequence[str],
           since: datetime | None, until: datetime | None,
           *extra: str) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or "") and its arguments: session ids, ``since`` <= label < ``until``,
    and ``extra`` conditions (no arguments)."""
    where: list[str] = []
    args: list[Any] = []
    if sessions:
        where.append(_in(session_col, sessions))
        args.extend(sessions)
    if since is not None:
        where.append(f"{time_col} >= ?")
        args.append(format_ts(since))
    if until is not None:
        where.append(f"{time_col} < ?")
        args.append(format_ts(until))
    where.extend(extra)
    return (" WHERE " + " AND ".join(where) if where else ""), args


#: A streamed row with its conversation-order key (session seq, seq, kind, rowid).
_Keyed = tuple[tuple[int, int, int, int], Any]


def _keyed_message(r: tuple[Any, ...]) -> _Keyed:
    return (r[0], r[3], 0, r[1]), MessageRow(r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                             bool(r[9]), r[10], bool(r[11]))


def _keyed_tool(r: tuple[Any, ...]) -> _Keyed:
    return (r[0], r[3], 1, r[1]), ToolRow(*r[2:14], bool(r[14]))


# ---------------------------------------------------------------------------- queries


class Queries:
    """Read queries over one connection (read-only or not)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._streams: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()

    # -- messages ---------------------------------------------------------------------

    def iter_messages(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                      until: datetime | None = None,
                      role: str | None = None) -> Generator[MessageRow, None, None]:
        """Stream messages in conversation order (sessions by seq, then messages by seq).

        ``since`` is inclusive and ``until`` exclusive (on ``created_at``); ``sessions`` empty
        means all. Close the iterator (or the store) when stopping early: its cursor closes.
        """
        with closing(self._messages(sessions, since, until, role)) as keyed:
            for _, row in keyed:
                yield row

    def iter_tools(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                   until: datetime | None = None) -> Generator[ToolRow, None, None]:
        """Stream tool executions in conversation order (filters on ``started_at``)."""
        with closing(self._tools(sessions, since, until)) as keyed:
            for _, row in keyed:
                yield row

    def iter_conversation(self, *, sessions: Sequence[str] = (),
                          since: datetime | None = None, until: datetime | None = None,
                          role: str | None = None,
                          ) -> Generator[MessageRow | ToolRow, None, None]:
        """Messages and tool executions merged in conversation order (at an equal seq, the
        message first), streamed: two ordered cursors, no sort. ``role`` is a message role
        or ``"tool"``."""
        if role is not None and role not in EXPORT_ROLES:
            raise ValueError(f"role must be one of {EXPORT_ROLES}, not {role!r}")
        if role == "tool":
            yield from self.iter_tools(sessions=sessions, since=since, until=until)
            return
        with closing(self._messages(sessions, since, until, role)) as messages:
            if role is not None or not self._has_tools():
                for _, row in messages:
                    yield row
                return
            with closing(self._tools(sessions, since, until)) as tools:
                for _, row in heapq.merge(messages, tools, key=lambda keyed: keyed[0]):
                    yield row

    def close_streams(self) -> None:
        """Close the cursors of every stream still open (a caller that stopped iterating
        early). The store calls it before closing the connection."""
        for stream in list(self._streams):
            stream.close()

    def _has_tools(self) -> bool:
        return self.conn.execute("SELECT EXISTS (SELECT 1 FROM tool_executions)").fetchone()[0]

    def _stream(self, sql: str, args: Sequence[Any],
                make: Callable[[tuple[Any, ...]], _Keyed]) -> Generator[_Keyed, None, None]:
        """``make(row)`` for each row of ``sql``, fetched in batches; the cursor is closed
        when the stream ends, is closed, or the store closes (:meth:`close_streams`)."""
        stream = self._fetch(sql, args, make)
        self._streams.add(stream)
        return stream

    def _fetch(self, sql: str, args: Sequence[Any],
               make: Callable[[tuple[Any, ...]], _Keyed]) -> Generator[_Keyed, None, None]:
        cur = self.conn.execute(sql, args)
        try:
            while rows := cur.fetchmany(_FETCH):
                for r in rows:
                    yield make(r)
        finally:
            cur.close()

    def _messages(self, sessions: Sequence[str], since: datetime | None,
                  until: datetime | None,
                  role: str | None) -> Generator[_Keyed, None, None]:
        where, args = _where("s.id", "m.created_at", sessions, since, until)
        if role is not None:
            if role not in ROLES:
                raise ValueError(f"role must be one of {ROLES}, not {role!r}")
            where += (" AND" if where else " WHERE") + " m.role = ?"
            args.append(role)
        return self._stream(f"SELECT s.seq, m.id, {_MESSAGE_COLUMNS} FROM {_ORDERED_JOIN}"
                            f"{where} ORDER BY s.seq, m.seq, m.id", args, _keyed_message)

    def _tools(self, sessions: Sequence[str], since: datetime | None,
               until: datetime | None) -> Generator[_Keyed, None, None]:
        where, args = _where("s.id", "t.started_at", sessions, since, until)
        return self._stream(f"SELECT s.seq, t.id, {_TOOL_COLUMNS} FROM {_ORDERED_TOOLS}"
                            f"{where} ORDER BY s.seq, t.seq, t.id", args, _keyed_tool)

    def tool_counts(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                    until: datetime | None = None) -> dict[str, dict[str, int]]:
        """Tool executions started in [``since``, ``until``): ``{name: {status: calls}}``,
        names and statuses sorted."""
        where, args = _where("session_id", "started_at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT name, status, count(*) FROM tool_executions{where}"
            " GROUP BY name, status ORDER BY name, status", args).fetchall()
        out: dict[str, dict[str, int]] = {}
        for name, status, n in rows:
            out.setdefault(name, {})[status] = n
        return out

    def recent_turns(self, session_ids: Sequence[str] | None,
                     limit: int) -> list[tuple[str, str]]:
        """``(role, text)`` of the last ``limit`` non-empty messages in conversation order,
        oldest first. ``session_ids`` None (or empty) means every session."""
        if limit <= 0:
            return []
        where, args = _where("s.id", "", session_ids or (), None, None, "m.text != ''")
        rows = self.conn.execute(
            f"SELECT m.role, m.text FROM {_ORDERED_JOIN}{where}"
            " ORDER BY s.seq DESC, m.seq DESC, m.id DESC LIMIT ?", [*args, limit]).fetchall()
        rows.reverse()
        return [(role, text) for role, text in rows]

    def count_interrupted(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                          until: datetime | None = None) -> int:
        """Messages created in [``since``, ``until``) marked interrupted (cut-off replies)."""
        where, args = _where("session_id", "created_at", sessions, since, until,
                             "interrupted = 1")
        return int(self.conn.execute(f"SELECT count(*) FROM messages{where}",
                                     args).fetchone()[0])

    # -- sessions ---------------------------------------------------------------------

    def get_session(self, session_id: str) -> SessionRow | None:
        """One session, or None."""
        r = self.conn.execute(_SESSION_SELECT + " WHERE s.id = ?", (session_id,)).fetchone()
        return None if r is None else SessionRow(*r)

    def list_sessions(self) -> list[SessionRow]:
        """All sessions in order (by seq)."""
        rows = self.conn.execute(_SESSION_SELECT + " ORDER BY s.seq").fetchall()
        return [SessionRow(*r) for r in rows]

    def session_stats(self, sessions: Sequence[str] = (), since: datetime | None = None,
                      until: datetime | None = None) -> list[SessionStatsRow]:
        """Sessions started in [``since``, ``until``), in order, with their
        ``metadata["stats"]`` object (None when absent or unreadable) and wake facts."""
        where, args = _where("id", "started_at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT id, started_at, previous_session_id, metadata FROM sessions{where}"
            " ORDER BY seq", args).fetchall()
        out = []
        for sid, started, previous, meta in rows:
            try:
                loaded = json.loads(meta) if meta else None
            except ValueError:
                loaded = None
            stats = None
            if isinstance(loaded, dict) and isinstance(loaded.get("stats"), dict):
                stats = loaded["stats"]
            out.append(SessionStatsRow(sid, started, previous, stats, wake_facts(loaded)))
        return out

    # -- responses --------------------------------------------------------------------

    def usage_totals(self, sessions: Sequence[str] = ()) -> list[UsageRow]:
        """Token usage summed per session (all sessions by default), in order."""
        where, args = _where("s.id", "", sessions, None, None)
        rows = self.conn.execute(
            "SELECT s.id, count(r.response_id),"
            " COALESCE(sum(r.input_text_tokens), 0), COALESCE(sum(r.input_audio_tokens), 0),"
            " COALESCE(sum(r.input_cached_tokens), 0), COALESCE(sum(r.output_text_tokens), 0),"
            " COALESCE(sum(r.output_audio_tokens), 0)"
            " FROM sessions AS s LEFT JOIN responses AS r ON r.session_id = s.id"
            f"{where} GROUP BY s.id ORDER BY s.seq", args).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage_summary(self, by: str, *, sessions: Sequence[str] = (),
                      since: datetime | None = None,
                      until: datetime | None = None) -> list[UsageSummaryRow]:
        """Token usage of the responses created in [``since``, ``until``), grouped ``by``
        ``"day"`` (UTC date label of ``responses.created_at``) or ``"session"`` (sessions in
        order), each group split by ``local`` (billed first). Groups without responses are
        left out."""
        if by == "day":
            key, order = "substr(r.created_at, 1, 10)", "1"
        elif by == "session":
            key, order = "r.session_id", "min(s.seq)"
        else:
            raise ValueError(f"by must be 'day' or 'session', not {by!r}")
        where, args = _where("r.session_id", "r.created_at", sessions, since, until)
        rows = self.conn.execute(
            f"SELECT {key}, sum(r.billed IS NULL), sum(r.it), sum(r.ia), sum(r.ic), sum(r.ot),"
            f" sum(r.oa), sum(r.ct), sum(r.ca), {_IS_LOCAL} AS local,"
            f" COALESCE(sum(r.billed), 0)"
            f" FROM ({_USAGE_PER_RESPONSE}) AS r JOIN sessions AS s ON s.id = r.session_id"
            f"{where} GROUP BY {key}, local ORDER BY {order}, local", args).fetchall()
        return [UsageSummaryRow(*r[:9], bool(r[9]), float(r[10])) for r in rows]

    def response_latencies(self, *, sessions: Sequence[str] = (),
                           since: datetime | None = None,
                           until: datetime | None = None) -> tuple[list[int], list[int]]:
        """Sorted ``first_audio_ms`` and ``first_played_ms`` values (NULLs left out) of the
        responses created in [``since``, ``until``)."""
        out: list[list[int]] = []
        for col in ("first_audio_ms", "first_played_ms"):
            where, args = _where("session_id", "created_at", sessions, since, until,
                                 f"{col} IS NOT NULL")
            rows = self.conn.execute(f"SELECT {col} FROM responses{where} ORDER BY {col}",
                                     args).fetchall()
            out.append([int(r[0]) for r in rows])
        return out[0], out[1]

    def response_status_counts(self, *, sessions: Sequence[str] = (),
                               since: datetime | None = None,
                               until: datetime | None = None) -> dict[str, int]:
        """Responses created in [``since``, ``until``) counted by status (by name)."""
        where, args = _where("session_id", "created_at", sessions, since, until,
                             f"{BILLED_SECONDS} IS NULL")
        rows = self.conn.execute(
            f"SELECT status, count(*) FROM responses{where} GROUP BY status ORDER BY status",
            args).fetchall()
        return dict(rows)

    # -- errors -----------------------------------------------------------------------

    def count_errors(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                     until: datetime | None = None) -> dict[str, int]:
        """Recorded errors in [``since``, ``until``) by source (``service`` / ``local``).

        With ``sessions``, errors not tied to a session are left out."""
        where, args = _where("session_id", "at", sessions, since, until)
        rows = self.conn.execute(f"SELECT source, count(*) FROM errors{where} GROUP BY source",
                                 args).fetchall()
        counts = dict.fromkeys(ERROR_SOURCES, 0)
        counts.update(dict(rows))
        return counts

    def list_errors(self, session_id: str | None = None) -> list[ErrorRow]:
        """Recorded errors (of one session, or all), in the order they were recorded."""
        sql = "SELECT session_id, at, source, type, code, message FROM errors"
        args: tuple[Any, ...] = ()
        if session_id is not None:
            sql += " WHERE session_id = ?"
            args = (session_id,)
        return [ErrorRow(*r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]
