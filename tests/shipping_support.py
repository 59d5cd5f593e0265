"""Helpers for the shipping tests: robot databases written as a run writes them (the storage
layer's Store and the recorder's ``record_calls``), and both sides read back for comparison."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from pg import PgServer

from r2d2voice.protocol.actions import (
    StoreError,
    StoreInterrupted,
    StoreLatency,
    StoreMessage,
    StoreResponse,
    StoreSession,
)
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.database import Store
from r2d2voice.storage.recorder import record_calls
from r2d2voice.storage.shipping.local import SHIPPED_TABLES
from r2d2voice.storage.shipping.tables import TABLES
from r2d2voice.storage.timestamps import format_ts

__all__ = ["USAGE", "converse", "local_rows", "record", "server_rows"]

USAGE = {"input_token_details": {"text_tokens": 10, "audio_tokens": 30, "cached_tokens": 8},
         "output_token_details": {"text_tokens": 5, "audio_tokens": 40}}
_BOOLS = {"interrupted", "text_kept"}


def record(store: Store, session_id: str, actions: Iterable[Any]) -> None:
    """Persist protocol records in one transaction, as the recorder does."""
    writer = store.write
    with writer.batch():
        for action in actions:
            for method, kwargs in record_calls(action):
                method(writer, session_id, **kwargs)


def converse(store: Store, *, turns: int = 2, tool: bool = True, error: bool = True,
             end: bool = True, previous: str | None = None, word: str = "hello") -> str:
    """One session as a run writes it: turns of user speech and replies (usage, latency), a
    tool call and its result, a service error, the end. Returns the session id."""
    sid = store.write.start_session(backend="local", model="gpt-realtime", voice="marin",
                                    previous_session_id=previous)
    record(store, sid, [StoreSession(f"sess_{sid}", "gpt-realtime")])
    seq = 0
    for n in range(turns):
        record(store, sid, [StoreMessage("user", f"u{n}", seq + 1, f"{word} {n}",
                                         raw='{"type": "transcript"}'),
                            StoreResponse(f"r{n}", "in_progress")])
        record(store, sid, [
            StoreMessage("assistant", f"a{n}", seq + 2, f"beep boop {n}", response_id=f"r{n}"),
            StoreResponse(f"r{n}", "completed", usage=USAGE, first_audio_ms=300.4),
            StoreLatency(f"r{n}", 420.0)])
        seq += 2
    if tool:
        record(store, sid, [StoreToolCall("call_1", "fc_1", "r0", seq + 1, "turn_head",
                                          '{"degrees": -90}')])
        record(store, sid, [StoreToolResult("call_1", "ok", "turned to -90", 0, 41.2)])
    if error:
        record(store, sid, [StoreError("server_error", "E1", "boom", fatal=False)])
    if end:
        store.write.end_session(sid)
    return sid


def interrupt(store: Store, session_id: str, item_id: str, seq: int, played_ms: int) -> None:
    record(store, session_id, [StoreInterrupted(item_id, seq, played_ms)])


def _norm(table: str, col: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return format_ts(value)
    if col in _BOOLS:
        return bool(value)
    if col in TABLES[table].json and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _rows(table: str, found: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    cols = TABLES[table].columns
    return sorted((tuple(_norm(table, c, v) for c, v in zip(cols, row, strict=True))
                   for row in found), key=repr)


def local_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every shipped table's rows in the robot database, normalised."""
    conn = sqlite3.connect(path)
    try:
        return {t: _rows(t, conn.execute(f"SELECT {', '.join(TABLES[t].columns)} FROM {t}"))
                for t in SHIPPED_TABLES}
    finally:
        conn.close()


def server_rows(pg: PgServer, db: str, device_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every shipped table's rows of ``device_id`` on the server, normalised like
    :func:`local_rows`."""
    with pg.connect(db) as conn:
        return {t: _rows(t, conn.execute(
            f"SELECT {', '.join(TABLES[t].columns)} FROM {t} WHERE device_id = %s",
            (device_id,)).fetchall()) for t in SHIPPED_TABLES}


def counts(pg: PgServer, db: str) -> dict[str, int]:
    """Rows per shipped table on the server, all devices."""
    with pg.connect(db) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in SHIPPED_TABLES}
