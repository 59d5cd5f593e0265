"""What the recorder holds while the database cannot be written: queued writes, the retry
schedule, and the status line the appliance shows.

Policy (the ``recorder → SQLite`` row of the channel table): a write that fails for lack of
space, an I/O error or a lock is kept, in order, with the others; the queue holds at most
:data:`PENDING_BOUND` records. Beyond that, new records are dropped and counted (an error in
the log at the first drop and every :data:`DROP_LOG_EVERY` after); session starts and ends are
never dropped, so the records that do get written always have their session. Retries back
off from :data:`RETRY_FIRST` seconds, doubling, to :data:`RETRY_MAX`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "DROP_LOG_EVERY",
    "PENDING_BOUND",
    "RETRY_FIRST",
    "RETRY_MAX",
    "Backoff",
    "PendingWrite",
    "StoreStatus",
]

#: Records held in memory while the database cannot be written (about 1,000 spoken turns;
#: a record is a transcript with its raw event, so at worst a few MB).
PENDING_BOUND = 5000
#: Seconds before the first retry; each failed retry doubles it, up to RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
#: Beyond the bound, an error is logged at the first drop and then every this many.
DROP_LOG_EVERY = 500


@dataclass(eq=False)
class PendingWrite:
    """One queued write: ``write(writer)`` in one transaction, labels stamped ``at``."""

    write: Callable[[Any], Any]
    records: int
    at: datetime
    what: str
    #: a session start or end: never dropped (the records after it need the session row)
    essential: bool = False
    #: transcript messages among the records (what a person misses most when lost)
    transcripts: int = 0
    #: a refusal that is not a condition to wait out (the awaiting caller gets it raised)
    error: Exception | None = None
    #: the caller still awaits the outcome
    awaited: bool = True


@dataclass(frozen=True)
class StoreStatus:
    """The recorder's state: ``ok``, ``waiting`` (the database cannot be written; ``reason``
    says why) or ``closed``. ``waiting`` and ``dropped`` count records (``transcripts_*``
    the transcript messages among them); ``retries`` the attempts after a failure;
    ``next_retry`` is when the next is due (trio clock)."""

    state: str
    waiting: int = 0
    dropped: int = 0
    reason: str | None = None
    retries: int = 0
    next_retry: float | None = None
    transcripts_waiting: int = 0
    transcripts_dropped: int = 0

    @property
    def lost(self) -> int:
        """Records that will never be written: dropped, and once closed, those waiting."""
        return self.dropped + (self.waiting if self.state == "closed" else 0)

    @property
    def transcripts_lost(self) -> int:
        """Transcript messages among :attr:`lost`."""
        return self.transcripts_dropped + (
            self.transcripts_waiting if self.state == "closed" else 0)

    @property
    def note(self) -> str:
        """What a status line should add ("" while all is well): the state while records
        wait, and any loss."""
        return "" if self.state != "waiting" and not self.lost else str(self)

    def __str__(self) -> str:
        if self.state == "waiting":
            text = f"{self.reason}: {self.waiting} records waiting"
        elif self.state == "closed" and self.waiting:
            text = f"{self.reason}: {self.waiting} records not written"
        else:
            text = f"database {self.state}"
        return text + (f", {self.dropped} dropped" if self.dropped else "")


class Backoff:
    """Retry delays: ``first``, doubling on each failure, at most ``cap``; reset on success."""

    def __init__(self, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def next_delay(self) -> float:
        """The delay before the next retry (and double it for the one after)."""
        delay = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first
