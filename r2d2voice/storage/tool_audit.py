"""Writes of the tool audit trail: one ``tool_executions`` row per call, inserted ``running``
when its arguments are complete, updated with the result.

Privacy mode (``store_text=False``) keeps no arguments and no output (either can repeat what
was said: a note to remember, a name to look up); the name, status, exit code, duration,
times and ids stay, which is what an audit of what the robot did needs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager

from r2d2voice.protocol.tool_records import TOOL_STATUSES

__all__ = ["ToolWrites"]

_INSERT_CALL = """
INSERT INTO tool_executions (session_id, seq, response_id, item_id, call_id, name, arguments,
                             status, started_at, text_kept)
VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)
ON CONFLICT (session_id, call_id) DO UPDATE SET
    response_id = COALESCE(excluded.response_id, tool_executions.response_id),
    item_id     = COALESCE(excluded.item_id, tool_executions.item_id),
    name        = excluded.name,
    arguments   = excluded.arguments,
    text_kept   = excluded.text_kept
"""

# A result may come after a reconnect, under the next session's id: it updates the newest row
# with its call id, in its own session first.
_SET_RESULT = """
UPDATE tool_executions
SET status = ?, output = ?, exit_code = ?, duration_ms = ?, text_kept = text_kept AND ?
WHERE id = (SELECT id FROM tool_executions WHERE call_id = ?
            ORDER BY session_id = ? DESC, id DESC LIMIT 1)
"""


class ToolWrites:
    """The :class:`~r2d2voice.storage.writer.Writer`'s tool execution writes (a mixin)."""

    store_text: bool
    _stamp: Callable[[], str]
    _transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]

    def record_tool_call(self, session_id: str, *, call_id: str, item_id: str | None,
                         response_id: str | None, seq: int, name: str,
                         arguments: str | None) -> None:
        """A call starts: its row, status ``running``, ``started_at`` stamped now. The same
        call id again (in the same session) updates the row and keeps its seq and time."""
        kept = self.store_text
        with self._transaction() as conn:
            conn.execute(_INSERT_CALL, (session_id, int(seq), response_id, item_id, call_id,
                                        name, arguments if kept else None, self._stamp(),
                                        int(kept)))

    def record_tool_result(self, session_id: str, *, call_id: str, status: str,
                           output: str | None = None, exit_code: int | None = None,
                           duration_ms: float | None = None) -> None:
        """A call finished: its status (``ok``, ``error``, ``timeout``, ``rejected``), output,
        exit code and duration (ms, monotonic). A call id never recorded changes nothing."""
        if status not in TOOL_STATUSES:
            raise ValueError(f"status must be one of {TOOL_STATUSES}, not {status!r}")
        kept = self.store_text
        ms = None if duration_ms is None else round(duration_ms)
        with self._transaction() as conn:
            conn.execute(_SET_RESULT, (status, output if kept else None, exit_code, ms,
                                       int(kept), call_id, session_id))
