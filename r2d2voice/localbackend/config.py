"""How the local backend behaves: :class:`BackendConfig` (with its :class:`Faults`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.wire import RATE

__all__ = ["BackendConfig"]


@dataclass(frozen=True)
class BackendConfig:
    """How the local backend behaves.

    ``api_key``: when set, the handshake must carry ``Authorization: Bearer <api_key>``,
    otherwise it is rejected with HTTP 401; when None any key (or none) is accepted.
    ``reply_seconds``: length of every reply. ``chunk_ms``: audio per
    ``response.output_audio.delta``. ``realtime_factor``: replies stream this many times
    faster than real time (1.0 = real time).
    """

    api_key: str | None = field(default=None, repr=False)
    reply_seconds: float = 1.0
    chunk_ms: int = 100
    realtime_factor: float = 1.0
    faults: Faults = field(default_factory=Faults)
    #: for tests: called with (session id, client event) for every JSON client event received
    observer: Callable[[str, dict[str, Any]], None] | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.reply_seconds > 0:
            raise ValueError(f"reply_seconds must be > 0, got {self.reply_seconds!r}")
        if not self.chunk_ms > 0:
            raise ValueError(f"chunk_ms must be > 0, got {self.chunk_ms!r}")
        if not self.realtime_factor > 0:
            raise ValueError(f"realtime_factor must be > 0, got {self.realtime_factor!r}")

    @property
    def effective_reply_seconds(self) -> float:
        """:attr:`Faults.reply_seconds` if set, else :attr:`reply_seconds`."""
        return self.faults.reply_seconds or self.reply_seconds

    @property
    def chunk_samples(self) -> int:
        return max(1, RATE * self.chunk_ms // 1000)

    @property
    def pace_s(self) -> float:
        """Time between two audio chunks."""
        return self.chunk_ms / 1000 / self.realtime_factor
