"""Transcript export (JSONL, CSV, Markdown) and the ``sessions`` table, streamed row by row.

Memory stays constant whatever the database size: messages come from
:meth:`Store.iter_messages` (a cursor, ``fetchmany``) and each is written as it arrives;
Markdown looks a session up only when the stream enters it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, TextIO

from r2d2voice.errors import UsageError
from r2d2voice.storage.store import ROLES, MessageRow, SessionRow, Store

__all__ = ["COLUMNS", "FORMATS", "format_sessions", "parse_time_option", "run_export"]

FORMATS = ("jsonl", "csv", "markdown")
#: Export columns, in order (JSONL keys, CSV header).
COLUMNS = (
    "session_id",
    "role",
    "text",
    "created_at",
    "item_id",
    "response_id",
    "interrupted",
    "played_ms",
)

_HAS_TIME = re.compile(r"[Tt :]")


def parse_time_option(value: str, *, option: str, end: bool = False) -> datetime:
    """An ISO 8601 date or datetime option as an aware UTC datetime (naive = UTC).

    With ``end`` (``--until``) the result is an exclusive bound: a date covers that whole
    day, a datetime includes messages stamped at that very millisecond.
    """
    text = value.strip()
    try:
        if not _HAS_TIME.search(text):  # a date: 2026-11-21 (or 20261121)
            day = date.fromisoformat(text)
            start = datetime.combine(day, time(), tzinfo=timezone.utc)
            return start + timedelta(days=1) if end else start
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option}: {value!r} is not an ISO 8601 date or datetime "
            "(e.g. 2026-11-21 or 2026-11-21T09:30:00Z)"
        ) from None
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    # Stored times have millisecond resolution: round down, then make --until inclusive.
    dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    return dt + timedelta(milliseconds=1) if end else dt


def run_export(
    db_path: str | os.PathLike[str],
    *,
    fmt: str = "jsonl",
    out: TextIO,
    sessions: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    role: str | None = None,
) -> int:
    """Write the selected messages of ``db_path`` to ``out``; returns the rows written.

    ``out`` should be opened with ``newline=""`` and UTF-8 (CSV writes its own CRLFs).
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if role is not None and role not in ROLES:
        raise UsageError(f"--role: {role!r} is not one of {', '.join(ROLES)}")
    since_dt = None if since is None else parse_time_option(since, option="--since")
    until_dt = None if until is None else parse_time_option(until, option="--until", end=True)
    if since_dt is not None and until_dt is not None and until_dt <= since_dt:
        raise UsageError(f"--until ({until}) is not after --since ({since})")
    with Store.open(db_path, create=False) as store:
        for sid in sessions:
            if store.get_session(sid) is None:
                raise UsageError(f"--session: no session {sid!r} in {os.fspath(db_path)}")
        rows = store.iter_messages(sessions=sessions, since=since_dt, until=until_dt, role=role)
        if fmt == "jsonl":
            return _write_jsonl(rows, out)
        if fmt == "csv":
            return _write_csv(rows, out)
        return _write_markdown(rows, out, store)


# ---------------------------------------------------------------------------- JSONL

# json.dumps(ensure_ascii=False) leaves these raw; str.splitlines() would break a line
# at them, so escape them to keep "one object per line" true for every reader.
_LINE_BREAKERS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def _escape_line_breakers(line: str) -> str:
    for char, escape in _LINE_BREAKERS:
        if char in line:  # rare: test first, str.replace/translate cost more than dumps
            line = line.replace(char, escape)
    return line


def _row_dict(row: MessageRow) -> dict[str, Any]:
    return {
        "session_id": row.session_id,
        "role": row.role,
        "text": row.text,
        "created_at": row.created_at,
        "item_id": row.item_id,
        "response_id": row.response_id,
        "interrupted": row.interrupted,
        "played_ms": row.played_ms,
    }


def _write_jsonl(rows: Iterable[MessageRow], out: TextIO) -> int:
    n = 0
    dumps = json.dumps
    for row in rows:
        line = dumps(_row_dict(row), ensure_ascii=False)
        out.write(_escape_line_breakers(line) + "\n")
        n += 1
    return n


# ---------------------------------------------------------------------------- CSV

# A spreadsheet runs a cell starting with one of these as a formula (CSV injection); such
# cells get a leading "'". Cells that already start with "'" get one too, so the rule is
# reversible: a reader drops one leading "'" from any cell that has one.
_CSV_GUARDED = ("=", "+", "-", "@", "\t", "\r", "'")


def _cell(value: str | None) -> str:
    if value is None:
        return ""
    return "'" + value if value.startswith(_CSV_GUARDED) else value


def _write_csv(rows: Iterable[MessageRow], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\r\n")  # QUOTE_MINIMAL: RFC 4180
    writer.writerow(COLUMNS)
    n = 0
    for r in rows:
        writer.writerow(
            (
                _cell(r.session_id),
                r.role,
                _cell(r.text),
                r.created_at,
                _cell(r.item_id),
                _cell(r.response_id),
                "true" if r.interrupted else "false",
                "" if r.played_ms is None else r.played_ms,
            )
        )
        n += 1
    return n


# ---------------------------------------------------------------------------- Markdown

_SPEAKER = {"user": "you", "assistant": "r2"}
_LINE_END = re.compile(r"\r\n|\r|\n")
_INDENT = "    "


def _clock(ts: str) -> str:
    """``2026-11-21T09:30:00.123Z`` -> ``2026-11-21 09:30:00``."""
    return f"{ts[:10]} {ts[11:19]}"


def _session_header(info: SessionRow | None, session_id: str) -> str:
    lines = [f"## Session {session_id}", ""]
    if info is not None:
        desc = f"Started {_clock(info.started_at)} UTC"
        if info.ended_at:
            desc += f", ended {_clock(info.ended_at)} UTC"
        desc += f" · backend `{info.backend}` · model `{info.model}`"
        if info.voice:
            desc += f" · voice `{info.voice}`"
        lines.append(desc + ".")
        if info.previous_session_id:
            lines.append(f"Continues session {info.previous_session_id}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def _turn(row: MessageRow, day: str) -> str:
    # The time shows the date only when the turn is not on the session's first day.
    when = row.created_at[11:19] if row.created_at[:10] == day else _clock(row.created_at)
    if row.interrupted:
        when += ", interrupted"
        if row.played_ms is not None:
            when += f" after {row.played_ms / 1000:.1f} s"
    # Everything after ": " is the text; continuation lines are indented by four spaces
    # (a reader strips them), so lines like "# x" or "- x" never become markdown blocks.
    lines = _LINE_END.split(row.text)
    body = ("\n" + _INDENT).join(lines)
    return f"**{_SPEAKER[row.role]}** ({when}): {body}\n\n"


def _write_markdown(rows: Iterable[MessageRow], out: TextIO, store: Store) -> int:
    out.write("# r2d2voice transcript\n\n")
    n = 0
    current: str | None = None
    day = ""
    for row in rows:
        if row.session_id != current:
            current = row.session_id
            info = store.get_session(current)
            day = (info.started_at if info else row.created_at)[:10]
            out.write(_session_header(info, current))
        out.write(_turn(row, day))
        n += 1
    return n


# ---------------------------------------------------------------------------- sessions


def format_sessions(rows: Sequence[SessionRow]) -> str:
    """A plain-text table of sessions for the ``sessions`` command (oldest first)."""
    if not rows:
        return "no sessions recorded\n"
    header = ("ID", "STARTED (UTC)", "ENDED (UTC)", "TURNS", "BACKEND", "MODEL")
    table = [header] + [
        (
            r.id,
            _clock(r.started_at),
            _clock(r.ended_at) if r.ended_at else "-",
            str(r.turns),
            r.backend,
            r.model,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for line in table:
        cells = [
            cell.rjust(w) if i == 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"
