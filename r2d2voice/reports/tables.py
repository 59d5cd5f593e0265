"""Helpers the report commands share: time options, session and format checks, text tables."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, TextIO

from r2d2voice.errors import UsageError

__all__ = [
    "REPORT_FORMATS",
    "check_format",
    "clock",
    "parse_time_option",
    "table",
    "time_range",
    "write_report",
]

#: ``--format`` of the ``usage`` and ``stats`` reports.
REPORT_FORMATS = ("text", "json")

_HAS_TIME = re.compile(r"[Tt :]")


def parse_time_option(value: str, *, option: str, end: bool = False) -> datetime:
    """An ISO 8601 date or datetime option as an aware UTC datetime (naive = UTC).

    With ``end`` (``--until``) the result is an exclusive bound: a date covers that whole
    day, a datetime includes records stamped at that very millisecond.
    """
    text = value.strip()
    try:
        if not _HAS_TIME.search(text):  # a date: 2026-11-21 (or 20261121)
            day = date.fromisoformat(text)
            start = datetime.combine(day, time(), tzinfo=timezone.utc)
            return _later(start, timedelta(days=1)) if end else start
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option}: {value!r} is not an ISO 8601 date or datetime "
            "(e.g. 2026-11-21 or 2026-11-21T09:30:00Z)"
        ) from None
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    # Stored labels have millisecond resolution: round down, then make --until inclusive.
    dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    return _later(dt, timedelta(milliseconds=1)) if end else dt


def _later(dt: datetime, delta: timedelta) -> datetime:
    """``dt + delta``, or the last representable moment (``--until 9999-12-31``)."""
    try:
        return dt + delta
    except OverflowError:
        return datetime.max.replace(tzinfo=timezone.utc)


def time_range(since: str | None,
               until: str | None) -> tuple[datetime | None, datetime | None]:
    """``--since`` / ``--until`` as [since, until) bounds; UsageError unless until > since."""
    since_dt = None if since is None else parse_time_option(since, option="--since")
    until_dt = None if until is None else parse_time_option(until, option="--until", end=True)
    if since_dt is not None and until_dt is not None and until_dt <= since_dt:
        raise UsageError(f"--until ({until}) is not after --since ({since})")
    return since_dt, until_dt


def check_format(fmt: str, formats: Sequence[str] = REPORT_FORMATS) -> None:
    if fmt not in formats:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(formats)}")


def clock(ts: str) -> str:
    """``2026-11-21T09:30:00.123Z`` -> ``2026-11-21 09:30:00``."""
    return f"{ts[:10]} {ts[11:19]}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
          left: Sequence[int] = (0,)) -> list[str]:
    """Aligned columns, two spaces apart: the columns in ``left`` left-aligned, the rest
    right-aligned; trailing blanks stripped."""
    lines = [list(header), *map(list, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def write_report(out: TextIO, report: dict[str, Any], fmt: str,
                 text: Callable[[dict[str, Any]], str]) -> None:
    """The report as indented JSON, or as ``text(report)``."""
    if fmt == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(text(report))
