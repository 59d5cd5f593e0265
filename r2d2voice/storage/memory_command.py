"""``memory add`` and ``memory forget``: the owner changes what this robot remembers (in its own
database; a fleet server's copy follows at the next ship)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from r2d2voice.errors import UsageError
from r2d2voice.storage.database import Store
from r2d2voice.storage.memory import forget, query_words, remember
from r2d2voice.storage.timestamps import WallClock, utc_now

__all__ = ["memory_add_command", "memory_forget_command"]


def memory_add_command(db: str | os.PathLike[str], text: str, *, now: WallClock = utc_now,
                       out: TextIO | None = None) -> None:
    """Remember ``text`` as a fact added by the owner (the database is created if missing,
    as ``run`` would). UsageError for an empty or too long fact."""
    with Store.open(db, now=now) as store:
        try:
            fact, new = remember(store.conn, text, source="owner", now=now())
        except ValueError as exc:
            raise UsageError(f"memory add: {exc}") from None
    said = "remembered" if new else "already remembered as"
    (out or sys.stdout).write(f"{said} #{fact.id}: {fact.text}\n")


def memory_forget_command(db: str | os.PathLike[str], query: str, *,
                          now: WallClock = utc_now, out: TextIO | None = None) -> None:
    """Forget the facts holding every word of ``query`` and take the passages holding every
    word out of recall (the record keeps them: ``export`` still shows them)."""
    path = os.fspath(db)
    if not query_words(query):
        raise UsageError(f"memory forget: {query!r} has no words")
    if not os.path.exists(path):
        raise UsageError(f"no such database: {path}")
    with Store.open(path, now=now) as store:
        done = forget(store.conn, query, now=now())
    write = (out or sys.stdout).write
    if done.nothing:
        write(f"nothing remembered or said holds every word of {query!r}\n")
        return
    facts = "; ".join(f"#{f.id} {f.text}" for f in done.facts)
    n = len(done.facts)
    write(f"forgot {n} {'fact' if n == 1 else 'facts'}{': ' + facts if facts else ''}\n")
    n = done.passages
    write(f"{n} {'passage' if n == 1 else 'passages'} of past conversations no longer recalled"
          " (the record keeps them)\n")
