"""What a command that writes the robot's database checks before it starts: that ``--db``
(or R2D2_DB) names a SQLite file rather than a fleet server, and that it can be written now."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from r2d2voice.errors import UsageError

if TYPE_CHECKING:
    from r2d2voice.system.config import Settings

_WRITTEN_BY_SHIP = ("--db takes a SQLite path: {command} writes this robot's database; the fleet "
                    "is written by `r2d2voice ship --to URL` (and by run, with R2D2_SHIP_URL)")
#: What each writing command says when given a fleet server as its database.
_FLEET_REFUSALS = {
    "replay": _WRITTEN_BY_SHIP.format(command="replay"),
    "run": _WRITTEN_BY_SHIP.format(command="run"),
    "prune": "prune works on the robot's SQLite file: --db takes its path",
    "ship": "ship copies from the robot's SQLite file (--db takes its path) to --to URL",
}


def robot_db(settings: Settings, command: str, *, existing: bool = False) -> Path:
    """``settings.db`` for ``command``, which writes it; :class:`UsageError` (exit 2) when
    the setting names a fleet server or the database cannot be written now (before a
    conversation is held that could not be stored). ``existing``: check only a file that is
    there (the command says itself that a missing one is missing)."""
    if settings.fleet_db is not None:
        source = settings.sources.get("db", "")
        named = "--db" if source == "--db" else f"R2D2_DB {settings.where('db')}"
        raise UsageError(f"{named} names a fleet server; {_FLEET_REFUSALS[command]}")
    if existing and not os.path.exists(settings.db):
        return settings.db
    from r2d2voice.storage.connection import check_writable

    check_writable(settings.db)
    return settings.db
