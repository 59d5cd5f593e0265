"""How the local backend behaves: :class:`BackendConfig` (with its :class:`Faults`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.outputs import ChunkMs
from r2d2voice.localbackend.script import Script

__all__ = ["BackendConfig"]


@dataclass(frozen=True)
class BackendConfig:
    """How the local backend behaves.

    ``api_key``: when set, the handshake must carry ``Authorization: Bearer <api_key>``,
    otherwise it is rejected with HTTP 401; when None any key (or none) is accepted.
    ``reply_seconds``: length of every reply. ``chunk_ms``: audio per
    ``response.output_audio.delta``. ``realtime_factor``: replies stream this many times
    faster than real time (1.0 = real time). ``faults``: the misbehaviours and habits to
    imitate. ``script``: what each turn says or which tool it calls (None: beeps).
    """

    api_key: str | None = field(default=None, repr=False)
    reply_seconds: float = 1.0
    chunk_ms: int = 100
    realtime_factor: float = 1.0
    faults: Faults = field(default_factory=Faults)
    script: Script | None = None
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
    def chunk_ms_range(self) -> ChunkMs:
        """Audio per delta: :attr:`Faults.audio_delta_ms` if set, else :attr:`chunk_ms`."""
        return self.faults.audio_delta_ms or self.chunk_ms
