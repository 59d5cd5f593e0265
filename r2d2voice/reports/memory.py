"""``memory list`` and ``memory search``: what the robot remembers, read from its database (or a
fleet server's copy, with ``DEVICE`` first). Days are local calendar days."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import tzinfo
from typing import Any, TextIO

from r2d2voice.errors import UsageError
from r2d2voice.reports.source import FleetReader, open_records
from r2d2voice.storage.memory import (
    Fact,
    Passage,
    facts_json,
    iter_facts,
    passages_json,
    query_words,
    recall,
)
from r2d2voice.storage.timestamps import local_date, utc_now

__all__ = ["MEMORY_FORMATS", "memory_list_command", "memory_search_command"]

MEMORY_FORMATS = ("text", "json")


def memory_list_command(db: str | os.PathLike[str], *, fmt: str = "text",
                        devices: Sequence[str] = (), out: TextIO | None = None,
                        tz: tzinfo | None = None) -> None:
    """The remembered facts, newest first (per robot, from a fleet server)."""
    with open_records(db, devices) as records:
        if isinstance(records.read, FleetReader):
            facts: list[Any] = records.read.fleet.list_facts(devices=records.read.devices)
        else:
            facts = list(iter_facts(records.read.conn))
        where = records.where
    write = (out or sys.stdout).write
    if fmt == "json":
        write(json.dumps({"facts": _facts(facts, tz)}, ensure_ascii=False, indent=2) + "\n")
        return
    if not facts:
        write(f"no facts remembered in {where}\n")
        return
    write(f"{len(facts)} {'fact' if len(facts) == 1 else 'facts'} remembered in {where}"
          " (newest first):\n")
    for fact in facts:
        write(_fact_line(fact, tz) + "\n")


def memory_search_command(db: str | os.PathLike[str], query: str, *, fmt: str = "text",
                          devices: Sequence[str] = (), out: TextIO | None = None,
                          tz: tzinfo | None = None) -> None:
    """What ``recall`` finds for ``query``: facts, then passages of past conversations."""
    if not query_words(query):
        raise UsageError(f"memory search: {query!r} has no words to look for")
    with open_records(db, devices) as records:
        if isinstance(records.read, FleetReader):
            facts, passages = records.read.fleet.search_memory(query,
                                                               devices=records.read.devices)
        else:
            found = recall(records.read.conn, query, now=utc_now())
            facts, passages = found.facts, found.passages  # type: ignore[assignment]
    write = (out or sys.stdout).write
    if fmt == "json":
        write(json.dumps({"facts": _facts(facts, tz), "conversations": _passages(passages, tz)},
                         ensure_ascii=False, indent=2) + "\n")
        return
    if not facts and not passages:
        write(f"nothing remembered or said matches {query!r}\n")
        return
    if facts:
        write("facts:\n" + "".join(f"  {_fact_line(f, tz)}\n" for f in facts))
    if passages:
        write("conversations:\n" + "".join(f"  {_passage_line(p, tz)}\n" for p in passages))


def _device(row: Any) -> str:
    device = getattr(row, "device_id", None)
    return f"{device}  " if device else ""


def _fact_line(fact: Fact | Any, tz: tzinfo | None) -> str:
    owner = "  (added by the owner)" if fact.source == "owner" else ""
    return (f"{_device(fact)}#{fact.id}  {local_date(fact.created_at, tz).isoformat()}  "
            f"{' '.join(fact.text.split())}{owner}")


def _passage_line(passage: Passage | Any, tz: tzinfo | None) -> str:
    return (f"{_device(passage)}{local_date(passage.created_at, tz).isoformat()}  "
            f"{passage.role:<9}  {' '.join(passage.words.split())}")


def _facts(rows: list[Any], tz: tzinfo | None) -> list[dict[str, Any]]:
    return [{**({"device_id": r.device_id} if hasattr(r, "device_id") else {}), **shown,
             "source": r.source} for r, shown in zip(rows, facts_json(rows, tz), strict=True)]


def _passages(rows: list[Any], tz: tzinfo | None) -> list[dict[str, Any]]:
    return [{**({"device_id": r.device_id} if hasattr(r, "device_id") else {}), **shown}
            for r, shown in zip(rows, passages_json(rows, tz), strict=True)]
