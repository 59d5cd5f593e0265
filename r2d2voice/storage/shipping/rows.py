"""Rows read back from the fleet server: the local reports' shapes, with ``device_id`` first.

Time labels come back as the robot writes them (``YYYY-MM-DDTHH:MM:SS.mmmZ``, UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r2d2voice.storage.queries import TokenTotals

__all__ = [
    "FleetErrorRow",
    "FleetFactRow",
    "FleetMessageRow",
    "FleetPassageRow",
    "FleetSessionRow",
    "FleetSessionStatsRow",
    "FleetToolRow",
    "FleetUsageRow",
    "FleetUsageSummaryRow",
]


@dataclass(frozen=True)
class FleetMessageRow:
    """One transcript message (``text_kept`` False: written in privacy mode, no text)."""

    device_id: str
    session_id: str
    seq: int
    role: str
    text: str | None
    created_at: str
    item_id: str
    response_id: str | None
    interrupted: bool
    played_ms: int | None
    text_kept: bool = True


@dataclass(frozen=True)
class FleetToolRow:
    """One tool execution, in conversation order among the messages (``role`` is "tool";
    ``text_kept`` False: privacy mode, no arguments nor output)."""

    device_id: str
    session_id: str
    seq: int
    started_at: str
    item_id: str | None
    response_id: str | None
    call_id: str
    name: str
    arguments: str | None
    output: str | None
    status: str
    exit_code: int | None
    duration_ms: int | None
    text_kept: bool = True

    @property
    def role(self) -> str:
        return "tool"


@dataclass(frozen=True)
class FleetSessionRow:
    """One session with its message counts (``turns`` = user messages)."""

    device_id: str
    id: str
    started_at: str
    ended_at: str | None
    backend: str
    model: str
    voice: str | None
    turns: int
    messages: int
    previous_session_id: str | None
    service_session_id: str | None


@dataclass(frozen=True)
class FleetUsageRow(TokenTotals):
    """Token usage summed over one session's responses."""

    device_id: str
    session_id: str
    responses: int
    input_text: int
    input_audio: int
    input_cached: int
    output_text: int
    output_audio: int


@dataclass(frozen=True)
class FleetUsageSummaryRow:
    """Token usage of one device's responses in one group (a UTC day, or a session);
    ``cached_*_est`` split the cached total as the local report does; ``local``: responses
    of local-backend sessions (not billed), as the local row."""

    device_id: str
    key: str
    responses: int
    input_text: int
    input_audio: int
    input_cached: int
    output_text: int
    output_audio: int
    cached_text_est: float
    cached_audio_est: float
    local: bool = False
    #: the billed time of sessions billed by the second (GPT-Live)
    live_seconds: float = 0.0


@dataclass(frozen=True)
class FleetSessionStatsRow:
    """One session's pipeline counters (``metadata["stats"]``; None when not recorded)."""

    device_id: str
    session_id: str
    started_at: str
    previous_session_id: str | None
    stats: dict[str, Any] | None
    wake: dict[str, Any] | None = None  # as the local row's


@dataclass(frozen=True)
class FleetErrorRow:
    """One recorded error."""

    device_id: str
    session_id: str | None
    at: str
    source: str
    type: str | None
    code: str | None
    message: str


@dataclass(frozen=True)
class FleetFactRow:
    """One remembered fact (``source``: "conversation" or "owner")."""

    device_id: str
    id: int
    text: str
    created_at: str
    source: str


@dataclass(frozen=True)
class FleetPassageRow:
    """One message of a past conversation found by a memory search (not excluded by
    ``forget``), as stored."""

    device_id: str
    session_id: str
    role: str
    words: str
    created_at: str
