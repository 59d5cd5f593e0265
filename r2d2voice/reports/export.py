"""``export``: transcripts as JSONL, CSV or Markdown, streamed row by row in conversation order.

Memory stays constant whatever the database size: messages and tool executions come from
:meth:`Queries.iter_conversation` (two ordered cursors, merged) and each is written as it
arrives; Markdown looks a session up only when the stream enters it. ``--output`` is written
atomically.

Every row has every column (JSONL keys, CSV header): a message has ``null`` in the tool
columns, a tool execution (``role`` "tool") ``null`` in ``text``, ``interrupted`` and
``played_ms``. Text not kept (privacy mode) reads ``(not kept)`` with ``text_kept`` false.
Markdown (:mod:`~r2d2voice.reports.markdown`) escapes every text so it renders as said.

From a fleet server (``--db postgresql://…``, ``--device``) the rows are the same with
``device_id`` first (JSONL key, CSV column; Markdown names the robot in each session's
header), in order of device, then conversation.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.reports.markdown import write_markdown
from r2d2voice.reports.source import is_fleet, open_records
from r2d2voice.reports.tables import check_format, time_range
from r2d2voice.storage.queries import EXPORT_ROLES, ToolRow

if TYPE_CHECKING:
    from r2d2voice.storage.shipping.rows import FleetToolRow

__all__ = ["COLUMNS", "FLEET_COLUMNS", "FORMATS", "NOT_KEPT", "export_command", "run_export"]

FORMATS = ("jsonl", "csv", "markdown")
#: Export columns, in order (JSONL keys, CSV header).
COLUMNS = ("session_id", "seq", "role", "text", "created_at", "item_id", "response_id",
           "interrupted", "played_ms", "text_kept", "name", "arguments", "output", "status",
           "duration_ms", "call_id")
#: Export columns from a fleet server: the robot's id first.
FLEET_COLUMNS = ("device_id", *COLUMNS)
#: What a text reads when it was not kept (privacy mode; ``text_kept`` is false).
NOT_KEPT = "(not kept)"

#: A MessageRow or ToolRow, or their fleet twins (the same fields, ``device_id`` first).
AnyRow = Any


def export_command(db_path: str | os.PathLike[str], *,
                   output: str | os.PathLike[str] | None = None, out: TextIO | None = None,
                   **select: Any) -> int:
    """The ``export`` command: to ``output`` (atomically) or to ``out`` (default stdout);
    ``select`` are :func:`run_export`'s ``fmt`` and filters.

    ``db_path`` is a database file, or a fleet server URL (``devices``: only those robots).

    A regular ``output`` file is written next to itself under a temporary name, made 0600 and
    renamed at the end: a failed export leaves neither it nor the temporary file behind.
    An existing non-regular target (``/dev/null``, a FIFO) is written in place. An ``output``
    that is the database itself (or its ``-wal``/``-shm``), by whatever name, is refused.
    Returns the rows written.
    """

    def export_to(stream: TextIO) -> int:
        return run_export(db_path, out=stream, **select)

    if output is None:
        return export_to(out if out is not None else sys.stdout)
    if not is_fleet(db_path):
        check_not_the_database(Path(output), Path(db_path))
    return _write_atomically(Path(output), export_to)


#: Files SQLite keeps beside a database: writing over one of them corrupts it too.
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def check_not_the_database(output: Path, db: Path) -> None:
    """UsageError (exit 2) when ``output`` is the database ``db`` or one of its side files,
    by any name: the same path, a symlink or a hard link to it (the same inode)."""
    for suffix in _SIDE_FILES:
        side = Path(f"{db}{suffix}")
        try:
            same = os.path.samefile(output, side)
        except OSError:  # one of them does not exist: not the same file
            continue
        if not same:
            continue
        what = "the database" if not suffix else f"the database's {suffix[1:]} file"
        raise UsageError(f"--output {output} is {what} ({side}): exporting would overwrite "
                         "it; write the export to another file")


def run_export(db_path: str | os.PathLike[str], *, fmt: str = "jsonl", out: TextIO,
               sessions: Sequence[str] = (), since: str | None = None,
               until: str | None = None, role: str | None = None,
               devices: Sequence[str] = ()) -> int:
    """Write the selected messages of ``db_path`` (a file, or a fleet server URL with its
    ``devices``) to ``out``; returns the rows written.

    ``out`` should be opened with ``newline=""`` and UTF-8 (CSV writes its own CRLFs).
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database,
    before anything is written.
    """
    check_format(fmt, FORMATS)
    if role is not None and role not in EXPORT_ROLES:
        raise UsageError(f"--role: {role!r} is not one of {', '.join(EXPORT_ROLES)}")
    since_dt, until_dt = time_range(since, until)
    with open_records(db_path, devices) as records:
        records.check_sessions(sessions)
        # Closed before the database is, whatever stops the writing (a reader gone): its
        # cursors close while their connection is still open.
        with closing(records.read.iter_conversation(sessions=sessions, since=since_dt,
                                                    until=until_dt, role=role)) as rows:
            if fmt == "jsonl":
                return _write_jsonl(rows, out, fleet=records.fleet)
            if fmt == "csv":
                return _write_csv(rows, out, fleet=records.fleet)
            return write_markdown(rows, out, records, not_kept=NOT_KEPT)


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


def _tool_output(row: ToolRow | FleetToolRow) -> str | None:
    if row.text_kept or row.status == "running":
        return row.output
    return NOT_KEPT


def _row_dict(row: AnyRow) -> dict[str, Any]:
    if row.role == "tool":
        return {
            "session_id": row.session_id,
            "seq": row.seq,
            "role": "tool",
            "text": None,
            "created_at": row.started_at,
            "item_id": row.item_id,
            "response_id": row.response_id,
            "interrupted": None,
            "played_ms": None,
            "text_kept": row.text_kept,
            "name": row.name,
            "arguments": row.arguments if row.text_kept else NOT_KEPT,
            "output": _tool_output(row),
            "status": row.status,
            "duration_ms": row.duration_ms,
            "call_id": row.call_id,
        }
    return {
        "session_id": row.session_id,
        "seq": row.seq,
        "role": row.role,
        "text": row.text if row.text_kept else NOT_KEPT,
        "created_at": row.created_at,
        "item_id": row.item_id,
        "response_id": row.response_id,
        "interrupted": row.interrupted,
        "played_ms": row.played_ms,
        "text_kept": row.text_kept,
        "name": None,
        "arguments": None,
        "output": None,
        "status": None,
        "duration_ms": None,
        "call_id": None,
    }


def _fleet_dict(row: AnyRow) -> dict[str, Any]:
    return {"device_id": row.device_id, **_row_dict(row)}


def _write_jsonl(rows: Iterable[AnyRow], out: TextIO, *, fleet: bool = False) -> int:
    n = 0
    dumps = json.dumps
    as_dict = _fleet_dict if fleet else _row_dict
    for row in rows:
        line = dumps(as_dict(row), ensure_ascii=False)
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


def _flag(value: bool | None) -> str:
    return "" if value is None else "true" if value else "false"


def _int_cell(value: int | None) -> int | str:
    return "" if value is None else value


_NO_TOOL = ("",) * 6


def _csv_row(r: AnyRow) -> tuple[Any, ...]:
    if r.role == "tool":
        kept = r.text_kept
        output = _tool_output(r)
        return (_cell(r.session_id), r.seq, "tool", "", r.started_at, _cell(r.item_id),
                _cell(r.response_id), "", "", _flag(kept), _cell(r.name),
                _cell(r.arguments) if kept else NOT_KEPT, _cell(output), r.status,
                _int_cell(r.duration_ms), _cell(r.call_id))
    return (_cell(r.session_id), r.seq, r.role, _cell(r.text) if r.text_kept else NOT_KEPT,
            r.created_at, _cell(r.item_id), _cell(r.response_id), _flag(r.interrupted),
            _int_cell(r.played_ms), _flag(r.text_kept), *_NO_TOOL)


def _write_csv(rows: Iterable[AnyRow], out: TextIO, *, fleet: bool = False) -> int:
    writer = csv.writer(out, lineterminator="\r\n")  # QUOTE_MINIMAL: RFC 4180
    writer.writerow(FLEET_COLUMNS if fleet else COLUMNS)
    n = 0
    for r in rows:
        writer.writerow((_cell(r.device_id), *_csv_row(r)) if fleet else _csv_row(r))
        n += 1
    return n
