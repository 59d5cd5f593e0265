"""Records of tool executions, for the audit trail (the storage writer persists them).

Like the other ``Store*`` records they carry no wall-clock time: the writer stamps
``started_at`` when it writes :class:`StoreToolCall`. ``seq`` is the function call item's place
in the conversation, the same sequence as the messages'. ``duration_ms`` is measured on the
monotonic clock by whoever ran the tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TOOL_STATUSES", "StoreToolCall", "StoreToolResult"]

#: Final statuses of a tool execution (a row is ``"running"`` until its result is stored).
TOOL_STATUSES = ("ok", "error", "timeout", "rejected")


@dataclass(frozen=True, slots=True)
class StoreToolCall:
    """A call's arguments are complete: the execution starts (status ``running``)."""

    call_id: str
    item_id: str
    response_id: str | None
    seq: int
    name: str
    #: the arguments as the service sent them (JSON text, not necessarily valid)
    arguments: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class StoreToolResult:
    """A call finished: ``ok``, ``error`` (non-zero exit), ``timeout`` or ``rejected`` (not
    run: unknown tool, invalid arguments)."""

    call_id: str
    status: str
    output: str | None = field(default=None, repr=False)
    exit_code: int | None = None
    duration_ms: float | None = None

    def __post_init__(self) -> None:
        if self.status not in TOOL_STATUSES:
            raise ValueError(f"status must be one of {TOOL_STATUSES}, not {self.status!r}")
