"""Opening a database file: private permissions, header and application-id checks, read-only
opening that leaves the files as they were.

Only SQLite opens the database file. POSIX advisory locks belong to the process: closing *any*
descriptor of the file, say one opened to peek at its header, drops every lock the process's
other connections hold on it, and another process (an ``export``, a test) closing its own
connection would then think itself the last one and delete the WAL under a running writer —
what it wrote afterwards invisible to readers, and lost if it crashed. So the header is
checked by SQLite itself (``SQLITE_NOTADB``), and existence with ``stat``.

The connection is opened with ``check_same_thread=False`` and carries no lock of its own: its
user serialises the calls (the appliance runs them one at a time in a worker thread, see
:mod:`r2d2voice.storage.recorder`). ``isolation_level=None``: transactions are explicit.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from r2d2voice.errors import UsageError
from r2d2voice.storage.health import StoreUnavailable, is_not_a_database, is_transient
from r2d2voice.storage.schema import prepare

__all__ = ["check_writable", "connect"]



def connect(path: str, *, create: bool = True) -> sqlite3.Connection:
    """A connection to the r2d2voice database at ``path``.

    ``create=True``: missing directories are made 0700, a missing file 0600, the schema is
    created or migrated forward. ``create=False``: read-only; nothing is created or changed,
    and a missing or foreign file raises :class:`UsageError`.

    Read-write, a full disk, an I/O error or a lock held too long raise
    :class:`~r2d2voice.storage.health.StoreUnavailable`: a condition to wait out, not a
    verdict on the file.
    """
    conn = _connect_create(path) if create else _connect_readonly(path)
    try:
        prepare(conn, path, readonly=not create)
    except BaseException:
        conn.close()
        raise
    return conn


#: Reasons a database cannot be written that waiting out does not fix, as messages say them.
_UNWRITABLE = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of it is not a directory",
}
#: A full disk or an I/O error is waited out (the recorder holds records and retries).
_WAITED_OUT = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def check_writable(path: str | os.PathLike[str]) -> None:
    """:class:`UsageError` (exit 2) unless a database can be written at ``path`` now.

    The file, if there, must open for writing; its directory (or, when that is still to be
    made, the nearest one that exists) must take new files, as SQLite makes its journal
    beside the database: a probe file is made there and removed at once. Nothing else is
    created. A full disk or an I/O error passes: the recorder waits those out.
    """
    spath = os.fspath(path)
    if os.path.isdir(spath):
        raise UsageError(f"cannot write database {spath}: it is a directory")
    if os.path.lexists(spath):
        try:
            os.close(os.open(spath, os.O_RDWR | os.O_NONBLOCK))
        except OSError as exc:
            _refuse(spath, exc)
    folder = os.path.dirname(os.path.abspath(spath))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write database {spath}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".r2d2voice-", suffix=".probe", dir=folder)
    except OSError as exc:
        _refuse(spath, exc, folder)
    else:
        os.close(fd)
        os.unlink(probe)


def _refuse(path: str, exc: OSError, folder: str | None = None) -> None:
    if exc.errno in _WAITED_OUT:
        return
    if folder is not None and exc.errno == errno.ENOENT:  # /proc, /sys: no files made there
        reason = "the file system there takes no new files"
    else:
        reason = _UNWRITABLE.get(exc.errno or 0, exc.strerror or str(exc))
    where = f"cannot create files in {folder} ({reason})" if folder else reason
    raise UsageError(f"cannot write database {path}: {where}") from None


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    # The umask is process-wide: other threads creating files meanwhile get *tighter*
    # permissions, never looser. Only held while opening.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _connect_create(path: str) -> sqlite3.Connection:
    try:
        with _umask(0o077):
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            # SQLite creates a missing file now, 0600 under this umask, and gives -wal/-shm
            # the main file's mode; the header is its own first check (see prepare).
            return sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if is_transient(exc):
            raise StoreUnavailable(f"cannot open database {path}: {reason}") from exc
        raise UsageError(f"cannot open database {path}: {reason}") from exc


def _connect_readonly(path: str) -> sqlite3.Connection:
    try:
        os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"no such database: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot open database {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot open database {path}: Permission denied")
    uri = Path(os.path.abspath(path)).as_uri()
    # A read-only connection to a WAL database creates -wal/-shm and cannot remove them at
    # close. When no -wal exists (no writer around), open read-write with query_only on, so
    # SQLite deletes the side files it made; otherwise (or when we may not write the file)
    # open mode=ro, which still sees the writer's WAL. Without a writer and without the right
    # to write the file or its directory (a read-only mount, another user's 0644 file), a WAL
    # database can only be read as immutable.
    modes = ["ro"] if os.path.exists(path + "-wal") else ["rw", "ro", "ro&immutable=1"]
    error: sqlite3.Error | None = None
    for mode in modes:
        try:
            conn = sqlite3.connect(f"{uri}?mode={mode}", uri=True, check_same_thread=False,
                                   isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            error = exc
            continue
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens it for real
            return conn
        except sqlite3.Error as exc:
            conn.close()
            if is_not_a_database(exc):
                raise UsageError(f"{path} is not an r2d2voice database") from None
            error = exc
    raise UsageError(f"cannot open database {path}: {error}")
