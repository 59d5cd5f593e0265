"""Wall-clock labels as stored: text in one fixed format, ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

They sort and compare as strings, so ``--since`` / ``--until`` filter on them. They are labels
only: a board without a battery clock steps its wall clock at boot, so order never comes from
them (see ``sessions.seq`` and ``messages.seq``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timezone, tzinfo

__all__ = ["WallClock", "format_ts", "local_date", "parse_ts", "utc_now"]

#: Where a writer reads the wall clock (injectable, so tests can step it).
WallClock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current wall-clock time as an aware UTC datetime."""
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


def local_date(label: str, tz: tzinfo | None = None) -> date:
    """The calendar day of a stored label in time zone ``tz`` (None: the local zone)."""
    return parse_ts(label).astimezone(tz).date()
