"""``sessions``: the recorded sessions as a plain-text table, in order."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from r2d2voice.reports.tables import clock, table
from r2d2voice.storage.database import Store
from r2d2voice.storage.queries import SessionRow

__all__ = ["format_sessions", "sessions_command"]

_HEADER = ("ID", "STARTED (UTC)", "ENDED (UTC)", "TURNS", "BACKEND", "MODEL")


def sessions_command(db_path: str | os.PathLike[str], *, out: TextIO | None = None) -> None:
    """The ``sessions`` command: the table of ``db_path``'s sessions to ``out`` (stdout).

    Raises :class:`UsageError` for a missing / non-r2d2voice database.
    """
    with Store.open(db_path, create=False) as store:
        text = format_sessions(store.read.list_sessions())
    (out if out is not None else sys.stdout).write(text)


def format_sessions(rows: Sequence[SessionRow]) -> str:
    """A plain-text table of sessions in their order (``TURNS`` right-aligned)."""
    if not rows:
        return "no sessions recorded\n"
    cells = [
        (r.id, clock(r.started_at), clock(r.ended_at) if r.ended_at else "-", str(r.turns),
         r.backend, r.model)
        for r in rows
    ]
    return "\n".join(table(_HEADER, cells, left=(0, 1, 2, 4, 5))) + "\n"
