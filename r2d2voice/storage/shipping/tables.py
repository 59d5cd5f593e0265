"""The shipped tables: the columns a row carries (``device_id`` apart) and its natural key.

No database driver here: the robot's SQLite side (:mod:`~r2d2voice.storage.shipping.local`)
reads the same lists.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TABLES", "TableSpec"]


@dataclass(frozen=True)
class TableSpec:
    """A shipped table: the robot-side columns a row must carry (``device_id`` excluded),
    the natural key among them, and the columns needing conversion on the way."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    json: tuple[str, ...] = ()  # jsonb: dict/list, or JSON text (other text kept as a string)
    ints: tuple[str, ...] = ()  # integer columns the robot may hold as REAL (ms figures)

    @property
    def updated(self) -> tuple[str, ...]:
        """The non-key columns: an upsert replaces them all."""
        return tuple(c for c in self.columns if c not in self.key)


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "sessions",
            ("id", "seq", "started_at", "ended_at", "backend", "model", "voice",
             "service_session_id", "previous_session_id", "metadata"),
            key=("id",),
            json=("metadata",),
        ),
        TableSpec(
            "messages",
            ("session_id", "seq", "role", "text", "created_at", "item_id", "response_id",
             "interrupted", "played_ms", "raw_event", "text_kept"),
            key=("session_id", "item_id", "role"),
            ints=("played_ms",),
        ),
        TableSpec(
            "responses",
            ("session_id", "response_id", "status", "status_details", "created_at", "done_at",
             "input_text_tokens", "input_audio_tokens", "input_cached_tokens",
             "output_text_tokens", "output_audio_tokens", "first_audio_ms", "first_played_ms"),
            key=("session_id", "response_id"),
            json=("status_details",),
            ints=("first_audio_ms", "first_played_ms"),
        ),
        TableSpec(
            "errors",
            ("id", "session_id", "at", "source", "type", "code", "message"),
            key=("id",),
        ),
        TableSpec(
            "tool_executions",
            ("session_id", "response_id", "item_id", "call_id", "seq", "name", "arguments",
             "output", "status", "exit_code", "started_at", "duration_ms", "text_kept"),
            key=("session_id", "call_id"),
            ints=("duration_ms",),
        ),
        TableSpec(
            "facts",
            ("id", "text", "created_at", "source", "forgotten_at"),
            key=("id",),
        ),
        TableSpec(
            "recall_exclusions",
            ("session_id", "item_id", "role", "forgotten_at"),
            key=("session_id", "item_id", "role"),
        ),
    )
}  # fmt: skip
