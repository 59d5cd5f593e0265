"""Where a report reads from: this robot's SQLite database, or a fleet server
(``--db postgresql://…``, narrowed by ``--device``).

Both are read through the local query names (:class:`~r2d2voice.storage.queries.Queries`);
:class:`FleetReader` maps them onto the fleet server's queries for the selected robots. Rows
from a fleet carry ``device_id``; the reports add it to what they show.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from r2d2voice.errors import UsageError
from r2d2voice.storage.database import Store
from r2d2voice.storage.queries import Queries, SessionRow

if TYPE_CHECKING:
    from r2d2voice.storage.shipping.fleet import FleetStore
    from r2d2voice.storage.shipping.rows import (
        FleetMessageRow,
        FleetSessionRow,
        FleetSessionStatsRow,
        FleetToolRow,
        FleetUsageSummaryRow,
    )

__all__ = ["FleetReader", "Records", "is_fleet", "open_records"]


def is_fleet(db: str | os.PathLike[str]) -> bool:
    """``db`` names a fleet server rather than a database file."""
    text = os.fspath(db)
    if "://" not in text:  # a path: no need to load the PostgreSQL driver to say so
        return False
    from r2d2voice.storage.shipping.url import is_fleet_url

    return is_fleet_url(text)


class FleetReader:
    """The fleet server's reads under the local query names, for ``devices`` (empty: all)."""

    def __init__(self, fleet: FleetStore, devices: Sequence[str]) -> None:
        self.fleet = fleet
        self.devices = tuple(devices)

    def iter_conversation(self, *, sessions: Sequence[str] = (), since: datetime | None = None,
                          until: datetime | None = None, role: str | None = None,
                          ) -> Generator[FleetMessageRow | FleetToolRow, None, None]:
        """Messages and tool executions in order: device, session, then conversation."""
        return self.fleet.iter_messages(devices=self.devices, sessions=sessions, since=since,
                                        until=until, role=role, tools=True)

    def list_sessions(self, sessions: Sequence[str] = ()) -> list[FleetSessionRow]:
        return self.fleet.list_sessions(devices=self.devices, sessions=sessions)

    def get_session(self, session_id: str, device_id: str) -> FleetSessionRow | None:
        rows = self.fleet.list_sessions(devices=[device_id], sessions=[session_id])
        return rows[0] if rows else None

    def usage_summary(self, by: str, **window: Any) -> list[FleetUsageSummaryRow]:
        return self.fleet.usage_summary(by, devices=self.devices, **window)

    def response_latencies(self, **window: Any) -> tuple[list[int], list[int]]:
        return self.fleet.response_latencies(devices=self.devices, **window)

    def response_status_counts(self, **window: Any) -> dict[str, int]:
        return self.fleet.response_status_counts(devices=self.devices, **window)

    def count_interrupted(self, **window: Any) -> int:
        return self.fleet.count_interrupted(devices=self.devices, **window)

    def count_errors(self, **window: Any) -> dict[str, int]:
        return self.fleet.count_errors(devices=self.devices, **window)

    def tool_counts(self, **window: Any) -> dict[str, dict[str, int]]:
        """``{name: {status: calls}}`` over the selected robots, sorted like the local one."""
        out: dict[str, dict[str, int]] = {}
        counts = self.fleet.tool_call_counts(devices=self.devices, **window)
        for (name, status), n in sorted(counts.items()):
            out.setdefault(name, {})[status] = n
        return out

    def session_stats(self, sessions: Sequence[str] = (), since: datetime | None = None,
                      until: datetime | None = None) -> list[FleetSessionStatsRow]:
        return self.fleet.session_stats(devices=self.devices, sessions=sessions, since=since,
                                        until=until)


@dataclass(frozen=True)
class Records:
    """An open source of records: ``read`` answers the local query names."""

    read: Queries | FleetReader
    #: what a person is shown for it (a path, or ``host[:port]/db`` of the fleet server)
    where: str
    #: the robots a fleet report covers (selected, else every one on the server); () locally
    devices: tuple[str, ...] = ()

    @property
    def fleet(self) -> bool:
        return isinstance(self.read, FleetReader)

    def session(self, session_id: str,
                device_id: str | None = None) -> SessionRow | FleetSessionRow | None:
        """One session (of ``device_id`` on a fleet), or None."""
        if isinstance(self.read, FleetReader):
            return self.read.get_session(session_id, device_id or "")
        return self.read.get_session(session_id)

    def check_sessions(self, sessions: Sequence[str]) -> None:
        """UsageError for a ``--session`` id that is not there (among the selected robots)."""
        if not sessions:
            return
        if isinstance(self.read, FleetReader):
            found = {r.id for r in self.read.list_sessions(sessions)}
        else:
            found = {sid for sid in sessions if self.read.get_session(sid) is not None}
        for sid in sessions:
            if sid not in found:
                raise UsageError(f"--session: no session {sid!r} in {self._scope()}")

    def _scope(self) -> str:
        if isinstance(self.read, FleetReader) and self.read.devices:
            return f"{self.where} (devices {', '.join(self.read.devices)})"
        return self.where


@contextmanager
def open_records(db: str | os.PathLike[str], devices: Sequence[str] = ()) -> Iterator[Records]:
    """Open ``db`` for reading: a database file (read-only), or a fleet server URL.

    Raises :class:`UsageError` (exit 2) for ``devices`` with a file, a ``--device`` the fleet
    server has no rows of, or a missing / non-r2d2voice file; a fleet server that cannot be
    reached fails as its connection does (one line, exit 1 or 3).
    """
    if not is_fleet(db):
        if devices:
            raise UsageError("--device selects robots of a fleet database: use it with "
                             "--db postgresql://…")
        with Store.open(db, create=False) as store:
            yield Records(store.read, store.path)
        return
    from r2d2voice.storage.shipping.fleet import open_fleet

    with open_fleet(os.fspath(db), create_schema=False) as fleet:
        known = fleet.list_devices()
        for device in devices:
            if device not in known:
                raise UsageError(f"--device: no robot {device!r} on {fleet.target}"
                                 f" (robots there: {', '.join(known) or 'none'})")
        selected = tuple(sorted(set(devices)))
        yield Records(FleetReader(fleet, selected), str(fleet.target), selected or tuple(known))
