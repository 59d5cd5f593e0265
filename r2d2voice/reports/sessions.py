"""``sessions``: the recorded sessions as a plain-text table, in order (from a fleet server:
with a ``DEVICE`` column, in order of device, then session)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from r2d2voice.reports.source import open_records
from r2d2voice.reports.tables import clock, table
from r2d2voice.storage.queries import SessionRow

if TYPE_CHECKING:
    from r2d2voice.storage.shipping.rows import FleetSessionRow

__all__ = ["format_sessions", "sessions_command"]

_HEADER = ("ID", "STARTED (UTC)", "ENDED (UTC)", "TURNS", "BACKEND", "MODEL")


def sessions_command(db_path: str | os.PathLike[str], *, out: TextIO | None = None,
                     devices: Sequence[str] = ()) -> None:
    """The ``sessions`` command: the table of ``db_path``'s sessions to ``out`` (stdout).
    ``db_path`` is a database file, or a fleet server URL (``devices``: only those robots).

    Raises :class:`UsageError` for a missing / non-r2d2voice database.
    """
    with open_records(db_path, devices) as records:
        text = format_sessions(records.read.list_sessions(), fleet=records.fleet)
    (out if out is not None else sys.stdout).write(text)


def format_sessions(rows: Sequence[SessionRow | FleetSessionRow], *,
                    fleet: bool = False) -> str:
    """A plain-text table of sessions in their order (``TURNS`` right-aligned); ``fleet``
    adds the robot's id as the first column."""
    if not rows:
        return "no sessions recorded\n"
    cells = [
        (r.id, clock(r.started_at), clock(r.ended_at) if r.ended_at else "-", str(r.turns),
         r.backend, r.model)
        for r in rows
    ]
    if fleet:
        cells = [(r.device_id, *c) for r, c in zip(rows, cells, strict=True)]  # type: ignore[union-attr]
        return "\n".join(table(("DEVICE", *_HEADER), cells, left=(0, 1, 2, 3, 5, 6))) + "\n"
    return "\n".join(table(_HEADER, cells, left=(0, 1, 2, 4, 5))) + "\n"
