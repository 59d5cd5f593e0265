"""``export``: transcripts as JSONL, CSV or Markdown, streamed row by row in conversation order.

Memory stays constant whatever the database size: messages come from
:meth:`Queries.iter_messages` (a cursor, ``fetchmany``) and each is written as it arrives;
Markdown looks a session up only when the stream enters it. ``--output`` is written atomically.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.reports.tables import check_format, check_sessions, clock, time_range
from r2d2voice.storage.database import Store
from r2d2voice.storage.queries import MessageRow, SessionRow
from r2d2voice.storage.schema import ROLES

__all__ = ["COLUMNS", "FORMATS", "export_command", "run_export"]

FORMATS = ("jsonl", "csv", "markdown")
#: Export columns, in order (JSONL keys, CSV header).
COLUMNS = ("session_id", "seq", "role", "text", "created_at", "item_id", "response_id",
           "interrupted", "played_ms")


def export_command(db_path: str | os.PathLike[str], *, fmt: str = "jsonl",
                   sessions: Sequence[str] = (), since: str | None = None,
                   until: str | None = None, role: str | None = None,
                   output: str | os.PathLike[str] | None = None,
                   out: TextIO | None = None) -> int:
    """The ``export`` command: to ``output`` (atomically) or to ``out`` (default stdout).

    A regular ``output`` file is written next to itself under a temporary name, made 0600 and
    renamed at the end: a failed export leaves neither it nor the temporary file behind.
    An existing non-regular target (``/dev/null``, a FIFO) is written in place.
    Returns the rows written.
    """

    def export_to(stream: TextIO) -> int:
        return run_export(db_path, fmt=fmt, out=stream, sessions=sessions, since=since,
                          until=until, role=role)

    if output is None:
        return export_to(out if out is not None else sys.stdout)
    return _write_atomically(Path(output), export_to)


def run_export(db_path: str | os.PathLike[str], *, fmt: str = "jsonl", out: TextIO,
               sessions: Sequence[str] = (), since: str | None = None,
               until: str | None = None, role: str | None = None) -> int:
    """Write the selected messages of ``db_path`` to ``out``; returns the rows written.

    ``out`` should be opened with ``newline=""`` and UTF-8 (CSV writes its own CRLFs).
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database,
    before anything is written.
    """
    check_format(fmt, FORMATS)
    if role is not None and role not in ROLES:
        raise UsageError(f"--role: {role!r} is not one of {', '.join(ROLES)}")
    since_dt, until_dt = time_range(since, until)
    with Store.open(db_path, create=False) as store:
        check_sessions(store, sessions)
        rows = store.read.iter_messages(sessions=sessions, since=since_dt, until=until_dt,
                                        role=role)
        if fmt == "jsonl":
            return _write_jsonl(rows, out)
        if fmt == "csv":
            return _write_csv(rows, out)
        return _write_markdown(rows, out, store)


def _write_atomically(target: Path, write: Callable[[TextIO], int]) -> int:
    if target.is_dir():
        raise UsageError(f"--output: {target} is a directory")
    if target.exists() and not target.is_file():
        try:
            with open(target, "w", encoding="utf-8", newline="") as fh:
                return write(fh)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                   dir=target.parent)  # mode 0600
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as fh:
            n = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeFailure(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


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
        "seq": row.seq,
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
        writer.writerow((
            _cell(r.session_id),
            r.seq,
            r.role,
            _cell(r.text),
            r.created_at,
            _cell(r.item_id),
            _cell(r.response_id),
            "true" if r.interrupted else "false",
            "" if r.played_ms is None else r.played_ms,
        ))
        n += 1
    return n


# ---------------------------------------------------------------------------- Markdown

_SPEAKER = {"user": "you", "assistant": "r2"}
_LINE_END = re.compile(r"\r\n|\r|\n")
_INDENT = "    "


def _session_header(info: SessionRow | None, session_id: str) -> str:
    lines = [f"## Session {session_id}", ""]
    if info is not None:
        desc = f"Started {clock(info.started_at)} UTC"
        if info.ended_at:
            desc += f", ended {clock(info.ended_at)} UTC"
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
    when = row.created_at[11:19] if row.created_at[:10] == day else clock(row.created_at)
    if row.interrupted:
        when += ", interrupted"
        if row.played_ms is not None:
            when += f" after {row.played_ms / 1000:.1f} s"
    # Everything after ": " is the text; continuation lines are indented by four spaces
    # (a reader strips them), so lines like "# x" or "- x" never become markdown blocks.
    body = ("\n" + _INDENT).join(_LINE_END.split(row.text))
    return f"**{_SPEAKER[row.role]}** ({when}): {body}\n\n"


def _write_markdown(rows: Iterable[MessageRow], out: TextIO, store: Store) -> int:
    out.write("# r2d2voice transcript\n\n")
    n = 0
    current: str | None = None
    day = ""
    for row in rows:
        if row.session_id != current:
            current = row.session_id
            info = store.read.get_session(current)
            day = (info.started_at if info else row.created_at)[:10]
            out.write(_session_header(info, current))
        out.write(_turn(row, day))
        n += 1
    return n
