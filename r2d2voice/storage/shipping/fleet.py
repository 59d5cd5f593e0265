"""The fleet store: one psycopg connection to the fleet's PostgreSQL server.

Synchronous, like the robot's SQLite store: the appliance calls it from a worker thread
(``trio.to_thread.run_sync``), one call at a time. Every failure surfaces as a one-line
:mod:`~r2d2voice.storage.shipping.errors` exception without the password; after
:class:`FleetUnavailable` the store is closed, and the caller opens a new one when it retries.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from r2d2voice.errors import R2Error, UsageError
from r2d2voice.storage.shipping.errors import FleetUnavailable, fleet_error
from r2d2voice.storage.shipping.memory_queries import FleetMemory
from r2d2voice.storage.shipping.queries import FleetQueries
from r2d2voice.storage.shipping.server_schema import fleet_id, migrate, server_version
from r2d2voice.storage.shipping.uploader import upsert_rows, upsert_values
from r2d2voice.storage.shipping.url import FleetTarget, parse_fleet_url

__all__ = ["CONNECT_TIMEOUT_S", "FleetStore", "open_fleet"]

log = logging.getLogger(__name__)

#: Seconds libpq waits for a server that does not answer, unless the URL or
#: ``PGCONNECT_TIMEOUT`` says otherwise (libpq's own default is to wait forever).
CONNECT_TIMEOUT_S = 10
_FETCH = 2000  # rows per round trip when streaming
_cursor_ids = itertools.count(1)  # server-side cursor names, unique per process


def _connect(target: FleetTarget) -> psycopg.Connection:
    extra: dict[str, Any] = {"application_name": "r2d2voice", "autocommit": True}
    given = conninfo_to_dict(target.conninfo)  # parsed before: cannot fail here
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return psycopg.connect(target.conninfo, **extra)
    except psycopg.Error as exc:
        raise fleet_error(exc, target, "connecting") from None


class FleetStore(FleetQueries, FleetMemory):
    """A connected fleet server with the current schema. Use :func:`open_fleet`."""

    def __init__(self, conn: psycopg.Connection, target: FleetTarget, version: int,
                 fleet_id: str = "") -> None:
        self._conn: psycopg.Connection | None = conn
        self.target = target
        self.schema_version = version
        #: the server's own id (see :mod:`~r2d2voice.storage.shipping.server_schema`)
        self.fleet_id = fleet_id
        info = conn.info
        host = info.host if not info.host.startswith("/") else "localhost"
        port = "" if info.port == 5432 else f":{info.port}"
        #: ``host[:port]/dbname`` as libpq resolved it: what a person is shown
        self.where = f"{host}{port}/{info.dbname}"

    @property
    def closed(self) -> bool:
        return self._conn is None or self._conn.closed

    def close(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _mapped(self, doing: str) -> Iterator[psycopg.Connection]:
        """The connection, with psycopg errors turned into one-line fleet errors."""
        conn = self._conn
        if conn is None or conn.closed:
            raise FleetUnavailable(f"fleet server {self.target}: connection closed")
        try:
            yield conn
        except psycopg.Error as exc:
            err = fleet_error(exc, self.target, doing)
            if isinstance(err, FleetUnavailable) or conn.broken:
                self.close()
            raise err from None

    # -- writes -----------------------------------------------------------------------

    def upsert(self, table: str, device_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Ship one batch of ``table`` rows of ``device_id`` in one transaction.

        Tables: sessions, messages, responses, errors, tool_executions; each row has exactly
        that table's columns (``server_schema.TABLES[table].columns``). Returns the number
        of distinct rows sent. All or nothing: on an error none of the batch is kept.
        """
        rows = list(rows)
        with self._mapped(f"shipping a batch of {len(rows)} {table}") as conn:
            return upsert_rows(conn, table, device_id, rows)

    def upsert_values(self, table: str, device_id: str,
                      rows: Sequence[Sequence[Any]]) -> int:
        """:meth:`upsert` for rows given as values in the table's column order (the
        shipper's fast path: no dict per row)."""
        with self._mapped(f"shipping a batch of {len(rows)} {table}") as conn:
            return upsert_values(conn, table, device_id, rows)

    # -- reads (FleetQueries) ---------------------------------------------------------

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._mapped("reading the fleet") as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def _stream(self, query: str,
                params: Sequence[Any] = ()) -> Generator[tuple[Any, ...], None, None]:
        # A server-side cursor: constant memory however many rows match.
        with (
            self._mapped("reading the fleet") as conn,
            conn.transaction(),
            conn.cursor(name=f"r2d2voice_stream_{next(_cursor_ids)}") as cur,
        ):
            cur.itersize = _FETCH
            cur.execute(query, params)  # type: ignore[arg-type]
            yield from cur


def open_fleet(url: str | FleetTarget, *, create_schema: bool = True) -> FleetStore:
    """Connect to the fleet server at ``url``, create or migrate its schema, and return the
    store (a context manager). Raises a one-line :class:`~r2d2voice.errors.R2Error`:
    :class:`~r2d2voice.errors.UsageError` for a malformed URL, ``FleetUnavailable`` /
    ``FleetRejected`` (exit 1), ``FleetSchemaTooNew`` (exit 3).

    ``create_schema=False`` (the reports, which only read): a server without the r2d2voice
    schema is left as it is, a :class:`~r2d2voice.errors.UsageError` ("no r2d2voice data on
    …", exit 2), and "ready" is logged at DEBUG. An older r2d2voice schema is still migrated
    forward, as the next robot shipping to it would do."""
    target = url if isinstance(url, FleetTarget) else parse_fleet_url(url)
    conn = _connect(target)
    try:
        if not create_schema and server_version(conn) == 0:
            raise UsageError(f"no r2d2voice data on {target}")
        version = migrate(conn, target)
        server_id = fleet_id(conn)
    except R2Error:
        conn.close()
        raise
    except psycopg.Error as exc:
        conn.close()
        raise fleet_error(exc, target, "preparing the schema") from None
    log.log(logging.INFO if create_schema else logging.DEBUG, "fleet server %s ready (schema v%d)",
            target, version)
    return FleetStore(conn, target, version, server_id)
