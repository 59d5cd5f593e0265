"""Read queries over the fleet server, the PostgreSQL twins of the robot's report queries.

Each takes the local filters (``sessions``, ``since`` inclusive / ``until`` exclusive on the
time labels, ``role``) plus ``devices`` (empty: every robot), and returns the local shapes
with ``device_id`` added. Conversation order is device, then ``sessions.seq``, then the
per-session ``seq``; wall-clock labels only filter. Rows whose session has not reached the
server yet are left out of the ordered views (messages, sessions).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import closing
from datetime import datetime, timezone
from typing import Any

from r2d2voice.storage.queries import wake_facts
from r2d2voice.storage.shipping.rows import (
    FleetErrorRow,
    FleetMessageRow,
    FleetSessionRow,
    FleetSessionStatsRow,
    FleetToolRow,
    FleetUsageRow,
    FleetUsageSummaryRow,
)

__all__ = ["FleetQueries"]

ROLES = ("user", "assistant", "tool")
ERROR_SOURCES = ("service", "local")


def _label(col: str) -> str:
    """SQL turning a timestamptz column back into the robot's text label."""
    return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


def _ms_label(dt: datetime) -> str:
    """A time filter at the labels' precision (milliseconds; naive means UTC)."""
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class _Where:
    """Conditions joined by AND, with their parameters."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.params: list[Any] = []

    def any(self, col: str, values: Sequence[str]) -> _Where:
        if values:
            self.parts.append(f"{col} = ANY(%s)")
            self.params.append(list(values))
        return self

    def span(self, col: str, since: datetime | None, until: datetime | None) -> _Where:
        if since is not None:
            self.parts.append(f"{col} >= %s::timestamptz")
            self.params.append(_ms_label(since))
        if until is not None:
            self.parts.append(f"{col} < %s::timestamptz")
            self.params.append(_ms_label(until))
        return self

    def add(self, cond: str, *params: Any) -> _Where:
        self.parts.append(cond)
        self.params.extend(params)
        return self

    def __str__(self) -> str:
        return " WHERE " + " AND ".join(self.parts) if self.parts else ""


def _filters(dev: str, sid: str, time: str, devices: Sequence[str], sessions: Sequence[str],
             since: datetime | None, until: datetime | None) -> _Where:
    return _Where().any(dev, devices).any(sid, sessions).span(time, since, until)


_MESSAGES = f"""
SELECT 0, m.device_id, m.session_id, m.seq, m.role, m.text, {_label("m.created_at")},
       m.item_id, m.response_id, m.interrupted, m.played_ms,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, s.seq, s.id, m.text_kept
FROM sessions AS s JOIN messages AS m ON m.device_id = s.device_id AND m.session_id = s.id
"""
_TOOLS = f"""
SELECT 1, t.device_id, t.session_id, t.seq, 'tool', NULL, {_label("t.started_at")},
       t.item_id, t.response_id, NULL, NULL,
       t.call_id, t.name, t.arguments, t.output, t.status, t.exit_code, t.duration_ms,
       s.seq, s.id, t.text_kept
FROM sessions AS s JOIN tool_executions AS t ON t.device_id = s.device_id AND t.session_id = s.id
"""
# device, session order, then the per-session seq; ties (equal seq) broken by kind and ids.
_CONVERSATION_ORDER = " ORDER BY 2, 19, 20, 4, 1, 8, 5"

_SESSIONS = f"""
SELECT s.device_id, s.id, {_label("s.started_at")}, {_label("s.ended_at")}, s.backend, s.model,
       s.voice, COALESCE(c.turns, 0), COALESCE(c.messages, 0), s.previous_session_id,
       s.service_session_id
FROM sessions AS s LEFT JOIN (
    SELECT device_id, session_id, count(*) FILTER (WHERE role = 'user') AS turns,
           count(*) AS messages
    FROM messages GROUP BY device_id, session_id
) AS c ON c.device_id = s.device_id AND c.session_id = s.id
"""

# Per response: token columns with NULL as 0, and the cached total split between text and
# audio in proportion to the response's own text/audio input (capped at that input).
# A per-second billed session's time (GPT-Live; NULL on any other row), as the robot's
# ``storage.queries.BILLED_SECONDS``.
_BILLED_SECONDS = "(status_details->>'billed_seconds')::float8"
_USAGE_PER_RESPONSE = f"""
SELECT device_id, session_id, created_at, it, ia, ic, ot, oa,
       CASE WHEN it + ia > 0 THEN least(ic, it + ia)::float8 * it / (it + ia) ELSE 0.0 END AS ct,
       CASE WHEN it + ia > 0 THEN least(ic, it + ia)::float8 * ia / (it + ia) ELSE 0.0 END AS ca,
       billed
FROM (SELECT device_id, session_id, created_at,
             COALESCE(input_text_tokens, 0) AS it, COALESCE(input_audio_tokens, 0) AS ia,
             COALESCE(input_cached_tokens, 0) AS ic, COALESCE(output_text_tokens, 0) AS ot,
             COALESCE(output_audio_tokens, 0) AS oa, {_BILLED_SECONDS} AS billed
      FROM responses) AS r
"""


class FleetQueries:
    """The read side of :class:`~r2d2voice.storage.shipping.fleet.FleetStore`."""

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _stream(self, query: str,
                params: Sequence[Any] = ()) -> Generator[tuple[Any, ...], None, None]:
        raise NotImplementedError

    def list_devices(self) -> list[str]:
        """Every device id with a session or an error on the server, sorted."""
        rows = self._query(
            "SELECT device_id FROM sessions UNION SELECT device_id FROM errors ORDER BY 1"
        )
        return [r[0] for r in rows]

    def iter_messages(
        self,
        *,
        devices: Sequence[str] = (),
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        role: str | None = None,
        tools: bool = False,
    ) -> Generator[FleetMessageRow | FleetToolRow, None, None]:
        """Stream messages (with ``tools``, tool executions too) in conversation order.

        ``role`` "user"/"assistant"/"tool" keeps that kind only; time filters apply to
        ``created_at`` (``started_at`` for tools).
        """
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        parts: list[str] = []
        params: list[Any] = []
        if role != "tool":
            where = _filters("s.device_id", "s.id", "m.created_at", devices, sessions, since,
                             until)
            if role is not None:
                where.add("m.role = %s", role)
            parts.append(_MESSAGES + str(where))
            params += where.params
        if tools and role in (None, "tool"):
            where = _filters("s.device_id", "s.id", "t.started_at", devices, sessions, since,
                             until)
            parts.append(_TOOLS + str(where))
            params += where.params
        if not parts:
            return
        # closed with this generator: the server-side cursor goes before the connection
        with closing(self._stream(" UNION ALL ".join(parts) + _CONVERSATION_ORDER,
                                  params)) as rows:
            for r in rows:
                if r[0] == 0:
                    yield FleetMessageRow(r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                          r[10], r[20])
                else:
                    yield FleetToolRow(r[1], r[2], r[3], r[6], r[7], r[8], r[11], r[12], r[13],
                                       r[14], r[15], r[16], r[17], r[20])

    def list_sessions(
        self, *, devices: Sequence[str] = (), sessions: Sequence[str] = ()
    ) -> list[FleetSessionRow]:
        """Sessions in conversation order (device, then session order)."""
        where = _Where().any("s.device_id", devices).any("s.id", sessions)
        rows = self._query(f"{_SESSIONS}{where} ORDER BY s.device_id, s.seq, s.id", where.params)
        return [FleetSessionRow(*r) for r in rows]

    def usage_totals(
        self, *, devices: Sequence[str] = (), sessions: Sequence[str] = ()
    ) -> list[FleetUsageRow]:
        """Token usage summed per session, in session order."""
        where = _Where().any("s.device_id", devices).any("s.id", sessions)
        rows = self._query(
            "SELECT s.device_id, s.id, count(r.response_id),"
            " COALESCE(sum(r.input_text_tokens), 0), COALESCE(sum(r.input_audio_tokens), 0),"
            " COALESCE(sum(r.input_cached_tokens), 0), COALESCE(sum(r.output_text_tokens), 0),"
            " COALESCE(sum(r.output_audio_tokens), 0)"
            " FROM sessions AS s LEFT JOIN responses AS r"
            " ON r.device_id = s.device_id AND r.session_id = s.id"
            f"{where} GROUP BY s.device_id, s.id, s.seq ORDER BY s.device_id, s.seq, s.id",
            where.params,
        )
        return [FleetUsageRow(*r) for r in rows]

    def usage_summary(
        self,
        by: str,
        *,
        devices: Sequence[str] = (),
        sessions: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[FleetUsageSummaryRow]:
        """Token usage of the responses created in [``since``, ``until``) per device, grouped
        ``by`` "day" (UTC date) or "session" (in session order), each group split by ``local``
        (local-backend sessions, billed first); empty groups left out. By day, a response
        whose session has not arrived yet counts as billed."""
        sessions_join = "JOIN sessions AS s ON s.device_id = r.device_id AND s.id = r.session_id"
        if by == "day":
            key = "to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            join, group, order = f" LEFT {sessions_join}", key, f"r.device_id, {key}"
        elif by == "session":
            key = "r.session_id"
            join = f" {sessions_join}"
            group, order = "r.session_id, s.seq", "r.device_id, s.seq, r.session_id"
        else:
            raise ValueError(f"by must be 'day' or 'session', not {by!r}")
        where = _filters("r.device_id", "r.session_id", "r.created_at", devices, sessions,
                         since, until)
        local = "COALESCE(s.backend = 'local' OR s.model = 'local', false)"  # as on the robot
        rows = self._query(
            f"SELECT r.device_id, {key}, count(*) FILTER (WHERE r.billed IS NULL), sum(r.it),"
            f" sum(r.ia), sum(r.ic), sum(r.ot), sum(r.oa), sum(r.ct), sum(r.ca), {local},"
            f" COALESCE(sum(r.billed), 0)"
            f" FROM ({_USAGE_PER_RESPONSE}) AS r{join}{where}"
            f" GROUP BY r.device_id, {group}, {local} ORDER BY {order}, {local}",
            where.params,
        )
        return [FleetUsageSummaryRow(*r) for r in rows]

    def response_latencies(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                           since: datetime | None = None, until: datetime | None = None,
                           ) -> tuple[list[int], list[int]]:
        """Sorted ``first_audio_ms`` and ``first_played_ms`` values (NULLs left out)."""
        out: list[list[int]] = []
        for col in ("first_audio_ms", "first_played_ms"):
            where = _filters("device_id", "session_id", "created_at", devices, sessions,
                             since, until).add(f"{col} IS NOT NULL")
            rows = self._query(f"SELECT {col} FROM responses{where} ORDER BY 1", where.params)
            out.append([int(r[0]) for r in rows])
        return out[0], out[1]

    def response_status_counts(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                               since: datetime | None = None, until: datetime | None = None,
                               ) -> dict[str, int]:
        """Responses created in [``since``, ``until``) counted by status."""
        where = _filters("device_id", "session_id", "created_at", devices, sessions, since,
                         until).add(f"{_BILLED_SECONDS} IS NULL")
        rows = self._query(
            f"SELECT status, count(*) FROM responses{where} GROUP BY status ORDER BY status",
            where.params,
        )
        return {status: int(n) for status, n in rows}

    def count_interrupted(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                          since: datetime | None = None, until: datetime | None = None,
                          ) -> int:
        """Messages created in [``since``, ``until``) marked interrupted."""
        where = _filters("device_id", "session_id", "created_at", devices, sessions, since,
                         until).add("interrupted")
        return int(self._query(f"SELECT count(*) FROM messages{where}", where.params)[0][0])

    def count_errors(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                     since: datetime | None = None, until: datetime | None = None,
                     ) -> dict[str, int]:
        """Errors in [``since``, ``until``) by source; with ``sessions``, errors not tied to a
        session are left out."""
        where = _filters("device_id", "session_id", "at", devices, sessions, since, until)
        rows = self._query(
            f"SELECT source, count(*) FROM errors{where} GROUP BY source", where.params
        )
        counts = dict.fromkeys(ERROR_SOURCES, 0)
        counts.update({source: int(n) for source, n in rows})
        return counts

    def tool_call_counts(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                         since: datetime | None = None, until: datetime | None = None,
                         ) -> dict[tuple[str, str], int]:
        """Tool executions started in [``since``, ``until``) counted by (name, status)."""
        where = _filters("device_id", "session_id", "started_at", devices, sessions, since,
                         until)
        rows = self._query(
            f"SELECT name, status, count(*) FROM tool_executions{where}"
            " GROUP BY name, status ORDER BY name, status",
            where.params,
        )
        return {(name, status): int(n) for name, status, n in rows}

    def session_stats(self, *, devices: Sequence[str] = (), sessions: Sequence[str] = (),
                      since: datetime | None = None, until: datetime | None = None,
                      ) -> list[FleetSessionStatsRow]:
        """Sessions started in [``since``, ``until``) with their ``metadata["stats"]``
        object (None when absent), in session order."""
        where = _filters("device_id", "id", "started_at", devices, sessions, since, until)
        rows = self._query(
            f"SELECT device_id, id, {_label('started_at')}, previous_session_id, metadata"
            f" FROM sessions{where} ORDER BY device_id, seq, id",
            where.params,
        )
        out = []
        for device, sid, started, previous, meta in rows:
            stats = meta.get("stats") if isinstance(meta, dict) else None
            out.append(FleetSessionStatsRow(device, sid, started, previous,
                                            stats if isinstance(stats, dict) else None,
                                            wake_facts(meta)))
        return out

    def list_errors(
        self, *, devices: Sequence[str] = (), session_id: str | None = None
    ) -> list[FleetErrorRow]:
        """Recorded errors (of one session, or all), per device, oldest first."""
        where = _Where().any("device_id", devices)
        if session_id is not None:
            where.add("session_id = %s", session_id)
        rows = self._query(
            f"SELECT device_id, session_id, {_label('at')}, source, type, code, message"
            f" FROM errors{where} ORDER BY device_id, at, id",
            where.params,
        )
        return [FleetErrorRow(*r) for r in rows]
