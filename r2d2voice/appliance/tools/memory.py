"""The memory tools ``remember``, ``recall`` and ``forget``: offered in every session while
``R2D2_MEMORY`` is on, never in privacy mode (``R2D2_STORE_TEXT=false``).

Each call opens its own connection to the database in a worker thread, one memory call at a
time (the recorder keeps writing on its own connection: WAL lets both). Outputs are JSON, each
match with its day (ISO date, local time zone) and who said it; bounded in size. A database
that cannot be used now (disk full, locked) is an ``error`` output, never a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from datetime import tzinfo
from typing import Any

import trio

from r2d2voice.appliance.tools.runner import ToolResult
from r2d2voice.errors import R2Error
from r2d2voice.storage import memory
from r2d2voice.storage.connection import connect
from r2d2voice.storage.health import describe
from r2d2voice.storage.memory import facts_json, passages_json
from r2d2voice.storage.memory_schema import MAX_FACT_CHARS
from r2d2voice.storage.timestamps import WallClock, utc_now

__all__ = ["FORGET_LIMIT", "MEMORY_TOOLS", "Memory"]

#: a ``forget`` matching more facts and passages than this forgets nothing (ask again, narrower)
FORGET_LIMIT = 100
_QUERY = {"type": "string", "minLength": 1, "maxLength": 200}

MEMORY_TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "remember": (
        "Keep a fact across conversations: something the person tells you that is worth "
        "knowing next time (names, birthdays, likes, plans) or asks you to remember. One short "
        "fact per call, written so it makes sense on its own later. Returns its id and what "
        "was kept.",
        {"type": "object", "required": ["fact"], "additionalProperties": False,
         "properties": {"fact": {"type": "string", "minLength": 1,
                                 "maxLength": MAX_FACT_CHARS,
                                 "description": "the fact, e.g. \"Anna's birthday is 3 May\""}}}),
    "recall": (
        "Search the facts you remembered and what was said in past conversations. Returns the "
        "best matches as JSON: facts, and conversation passages with the day each was said and "
        "who said it (user, or assistant: you).",
        {"type": "object", "required": ["query"], "additionalProperties": False,
         "properties": {"query": {**_QUERY, "description":
                                  "a few distinctive words: names, places, things"}}}),
    "forget": (
        "Forget what the person asks you to forget: the remembered facts and the passages of "
        "past conversations holding every word of the query are no longer recalled. Returns "
        "what was forgotten.",
        {"type": "object", "required": ["query"], "additionalProperties": False,
         "properties": {"query": {**_QUERY, "description":
                                  "the words of what to forget; every word must appear"}}}),
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class Memory:
    """The memory tools over the database at ``db_path``. ``now``: the wall clock (labels and
    ages); ``tz``: the zone of the days shown (None: the local one)."""

    tools = MEMORY_TOOLS

    def __init__(self, db_path: str | os.PathLike[str], *, now: WallClock = utc_now,
                 tz: tzinfo | None = None, forget_limit: int = FORGET_LIMIT) -> None:
        self.db_path = os.fspath(db_path)
        self.now = now
        self.tz = tz
        self.forget_limit = forget_limit
        self._limiter = trio.CapacityLimiter(1)

    async def call(self, name: str, args: dict[str, Any]) -> ToolResult:
        """Run memory tool ``name`` with validated ``args`` (in a worker thread)."""
        handler: Callable[[sqlite3.Connection, dict[str, Any]], ToolResult] = {
            "remember": self._remember, "recall": self._recall, "forget": self._forget}[name]
        try:
            return await trio.to_thread.run_sync(self._with_db, handler, args,
                                                 limiter=self._limiter)
        except (sqlite3.Error, R2Error) as exc:
            why = describe(exc) if isinstance(exc, sqlite3.Error) else str(exc)
            return ToolResult("error", f"the memory cannot be used now: {why}")

    def _with_db(self, handler: Callable[[sqlite3.Connection, dict[str, Any]], ToolResult],
                 args: dict[str, Any]) -> ToolResult:
        conn = connect(self.db_path, create=True)
        try:
            return handler(conn, args)
        finally:
            conn.close()

    def _remember(self, conn: sqlite3.Connection, args: dict[str, Any]) -> ToolResult:
        try:
            fact, new = memory.remember(conn, args["fact"], source="conversation",
                                        now=self.now())
        except ValueError as exc:
            return ToolResult("rejected", f"invalid arguments: {exc}")
        out: dict[str, Any] = {"id": fact.id, "kept": fact.text}
        if not new:
            out["already_known"] = True
        return ToolResult("ok", _dumps(out))

    def _recall(self, conn: sqlite3.Connection, args: dict[str, Any]) -> ToolResult:
        found = memory.recall(conn, args["query"], now=self.now())
        out: dict[str, Any] = {"facts": facts_json(found.facts, self.tz),
                               "conversations": passages_json(found.passages, self.tz)}
        if not found.facts and not found.passages:
            out["note"] = f"nothing remembered or said matches {args['query']!r}"
        return ToolResult("ok", _dumps(out))

    def _forget(self, conn: sqlite3.Connection, args: dict[str, Any]) -> ToolResult:
        query = args["query"]
        try:
            done = memory.forget(conn, query, now=self.now(), limit=self.forget_limit)
        except memory.TooBroad as exc:
            return ToolResult("error", f"nothing was forgotten: {exc}; name it more precisely"
                                       " (every word must appear)")
        except ValueError as exc:
            return ToolResult("rejected", f"invalid arguments: {exc}")
        out: dict[str, Any] = {
            "forgotten_facts": [{"id": f["id"], "fact": f["fact"]}
                                for f in facts_json(done.facts, self.tz)],
            "passages_excluded": done.passages,
            "examples": passages_json(done.examples, self.tz)}
        if done.nothing:
            out["note"] = f"nothing remembered or said holds every word of {query!r}"
        return ToolResult("ok", _dumps(out))
