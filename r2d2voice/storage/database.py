"""``Store``: one open database, its queries (``.read``) and, read-write, its writer
(``.write``)."""

from __future__ import annotations

import os
import sqlite3

from r2d2voice.storage.connection import connect
from r2d2voice.storage.queries import Queries
from r2d2voice.storage.timestamps import WallClock, utc_now
from r2d2voice.storage.writer import Writer

__all__ = ["Store"]


class Store:
    """One SQLite connection to an r2d2voice database. Use :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: str, *, readonly: bool,
                 now: WallClock = utc_now, store_text: bool = True) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.readonly = readonly
        self.read = Queries(conn)
        self._writer = None if readonly else Writer(conn, now=now, store_text=store_text)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True,
             now: WallClock = utc_now, store_text: bool = True) -> Store:
        """Open the database at ``path``: ``create=True`` creates or migrates it (see
        :func:`~r2d2voice.storage.connection.connect`), ``create=False`` opens it read-only.
        ``now`` is the writer's wall clock (labels only); ``store_text=False`` is privacy
        mode (see :class:`~r2d2voice.storage.writer.Writer`)."""
        spath = os.fspath(path)
        return cls(connect(spath, create=create), spath, readonly=not create, now=now,
                   store_text=store_text)

    @property
    def write(self) -> Writer:
        """The writer; a read-only store has none."""
        if self._writer is None:
            raise RuntimeError(f"{self.path} was opened read-only (create=False)")
        return self._writer

    @property
    def conn(self) -> sqlite3.Connection:
        """The underlying connection (for benches and tests)."""
        if self._conn is None:
            raise RuntimeError("store is closed")
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent): first the cursors of streams a reader left
        open (so no finalizer later touches a closed database), then an open transaction is
        rolled back."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self.read.close_streams()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
