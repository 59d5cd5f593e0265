"""Shipping a robot's database to the fleet server: changed rows since the watermarks, batch by
batch, each watermark moved only after the server committed the batch.

Synchronous (SQLite and psycopg calls block): the CLI calls :func:`ship_once` directly, the
appliance through :func:`~r2d2voice.storage.shipping.forever.ship_forever`, in a worker thread.
A ship that stops anywhere (a lost server, a kill) leaves every watermark at a batch the
server has; the next ship sends the rest, and a batch sent twice is upserted in place, so the
server ends with exactly one copy of every row.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.storage.connection import connect
from r2d2voice.storage.health import StoreUnavailable, describe, is_transient
from r2d2voice.storage.shipping.device import resolve_device_id
from r2d2voice.storage.shipping.fleet import FleetStore, open_fleet
from r2d2voice.storage.shipping.local import (
    RECORD_TABLES,
    SHIPPED_TABLES,
    advance,
    arm,
    ensure_ship_log,
    log_marks,
    read_changes,
    watermarks,
)
from r2d2voice.storage.shipping.url import FleetTarget, parse_fleet_url
from r2d2voice.storage.timestamps import format_ts, utc_now

__all__ = ["DEFAULT_BATCH", "ShipReport", "Shipper", "ship_once"]

log = logging.getLogger("r2d2voice.storage.shipping.shipper")

#: Rows per batch (one server transaction, one watermark step).
DEFAULT_BATCH = 5000
_NAMES = {"sessions": ("session", "sessions"), "messages": ("message", "messages"),
          "responses": ("response", "responses"),
          "tool_executions": ("tool execution", "tool executions"),
          "errors": ("error", "errors"), "facts": ("fact", "facts"),
          "recall_exclusions": ("recall exclusion", "recall exclusions")}


@dataclass
class ShipReport:
    """What one ship sent: distinct rows per table (rows updated locally since are sent again
    and counted again)."""

    server: str
    device_id: str
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHIPPED_TABLES, 0))
    #: the first ship to this server (or as this device id): everything was queued again
    armed: bool = False
    #: False: stopped early (asked to stop, or another ship took over); the rest comes next time
    complete: bool = True
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def __str__(self) -> str:
        where = f"to {self.server} as device '{self.device_id}'"
        if not self.total:
            return f"nothing new to ship {where}"
        # the record's tables always, the memory's when it shipped some
        counts = ", ".join(f"{n} {_NAMES[t][n != 1]}" for t, n in self.rows.items()
                           if n or t in RECORD_TABLES)
        text = f"shipped {counts} {where}"
        return text if self.complete else text + " (stopped early; the rest ships next time)"


class Shipper:
    """One robot database and one fleet server, kept open from one ship to the next.

    Not thread-safe: one call at a time (the appliance serialises them through a
    ``CapacityLimiter(1)``). After a failure the connection that failed is closed and the next
    :meth:`ship` opens it again.
    """

    def __init__(self, db_path: str | os.PathLike[str], url: str | FleetTarget,
                 device_id: str | None, *, batch: int = DEFAULT_BATCH) -> None:
        """``device_id`` None: the hostname. Raises :class:`UsageError` for a malformed URL,
        :class:`ConfigError` for a device id that is not one; connects only when shipping."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.db_path = os.fspath(db_path)
        self.target = url if isinstance(url, FleetTarget) else parse_fleet_url(url)
        self.device_id = resolve_device_id(device_id)
        self.batch = batch
        self._db: sqlite3.Connection | None = None
        self._fleet: FleetStore | None = None

    def close(self) -> None:
        """Close both connections (idempotent)."""
        db, self._db = self._db, None
        fleet, self._fleet = self._fleet, None
        if db is not None:
            db.close()
        if fleet is not None:
            fleet.close()

    def __enter__(self) -> Shipper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _local(self) -> sqlite3.Connection:
        if self._db is None:
            if not os.path.exists(self.db_path):
                raise UsageError(f"no such database: {self.db_path}")
            conn = connect(self.db_path, create=True)
            try:
                ensure_ship_log(conn)
            except BaseException:
                conn.close()
                raise
            self._db = conn
        return self._db

    def _server(self) -> FleetStore:
        if self._fleet is None or self._fleet.closed:
            self._fleet = open_fleet(self.target)
        return self._fleet

    def ship(self, stop: threading.Event | None = None) -> ShipReport:
        """Ship every change committed before this call (``stop`` set: return after the batch
        in flight, and close). Raises one-line :class:`~r2d2voice.errors.R2Error`\\ s: the
        fleet's (``FleetUnavailable``…), :class:`StoreUnavailable` for a database that cannot
        be used now, :class:`UsageError` for a missing or foreign one."""
        try:
            return self._ship(stop)
        except sqlite3.Error as exc:
            self._close_local()
            if is_transient(exc):
                raise StoreUnavailable(f"{self.db_path}: {describe(exc)}") from exc
            raise RuntimeFailure(f"{self.db_path}: {exc}") from exc
        except StoreUnavailable:
            self._close_local()
            raise
        finally:
            if stop is not None and stop.is_set():
                self.close()

    def _close_local(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _ship(self, stop: threading.Event | None) -> ShipReport:
        started = time.monotonic()
        fleet = self._server()  # first: a server that is down costs no database work
        conn = self._local()
        target, armed = arm(conn, fleet.fleet_id, self.device_id, fleet.where, _now())
        if armed:
            log.info("shipping everything to %s as device %r (a new target)", fleet.where,
                     self.device_id)
        report = ShipReport(fleet.where, self.device_id, armed=armed)
        upto = log_marks(conn)
        shipped = watermarks(conn)
        for table in SHIPPED_TABLES:
            while shipped[table] < upto[table]:
                if stop is not None and stop.is_set():
                    report.complete = False
                    return self._done(report, started)
                change = read_changes(conn, table, shipped[table], upto[table], self.batch)
                if change is None:
                    break
                if change.rows:
                    report.rows[table] += fleet.upsert_values(table, self.device_id, change.rows)
                if not advance(conn, target, table, change.last_seq, _now()):
                    log.info("another ship re-armed %s; stopping this one", self.db_path)
                    report.complete = False
                    return self._done(report, started)
                shipped[table] = change.last_seq
        return self._done(report, started)

    @staticmethod
    def _done(report: ShipReport, started: float) -> ShipReport:
        report.seconds = time.monotonic() - started
        return report


def _now() -> str:
    return format_ts(utc_now())  # a label only


def ship_once(sqlite_path: str | os.PathLike[str], fleet_url: str, device_id: str | None,
              batch: int = DEFAULT_BATCH) -> ShipReport:
    """Ship the robot database at ``sqlite_path`` to ``fleet_url`` as ``device_id`` (None:
    the hostname): every row the server does not have yet, and every row changed since it
    was shipped.

    Blocking (call it from a worker thread in trio code). Idempotent and incremental; raises a
    one-line :class:`~r2d2voice.errors.R2Error` (server down → exit 1, newer server schema →
    exit 3, missing database → exit 2); what was committed before a failure stays shipped.
    """
    with Shipper(sqlite_path, fleet_url, device_id, batch=batch) as shipper:
        return shipper.ship()
