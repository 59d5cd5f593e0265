"""Which storage failures are conditions to wait out (a full disk, an I/O error, a lock held
by another writer) rather than a database that cannot be used."""

from __future__ import annotations

import errno
import sqlite3

from r2d2voice.errors import RuntimeFailure

__all__ = ["StoreUnavailable", "describe", "is_not_a_database", "is_transient"]

# SQLite primary result codes (the low byte of extended codes such as SQLITE_IOERR_WRITE).
_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN = 5, 6, 8, 10, 13, 14
_TRANSIENT_SQLITE = {_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN}
_NOTADB = 26
# EROFS: an SD card that the kernel remounted read-only after errors.
_TRANSIENT_ERRNO = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS}


class StoreUnavailable(RuntimeFailure):
    """The database cannot be opened or written right now (disk full, I/O error, locked).

    Not a verdict on the file: the recorder keeps records in memory and retries."""


def is_transient(exc: BaseException) -> bool:
    """``exc`` is a condition that may go away: no space, an I/O error, a busy database."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _TRANSIENT_SQLITE
        return isinstance(exc, sqlite3.OperationalError) and _looks_transient(str(exc))
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNO
    return False


def is_not_a_database(exc: BaseException) -> bool:
    """``exc`` says the file is not an SQLite database at all (``SQLITE_NOTADB``)."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code == _NOTADB or "file is not a database" in str(exc)


def _looks_transient(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("disk is full", "disk i/o error", "database is locked",
                                   "unable to open database file", "readonly database"))


def describe(exc: BaseException) -> str:
    """A short reason for a status line: ``database full``, ``database unavailable (…)``."""
    if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        == _FULL)
    if full:
        return "database full"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"database unavailable ({reason})"
