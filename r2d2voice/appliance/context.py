"""The shapes of a run's parts: where microphone audio comes from (:class:`Source`), where
reply audio goes (:class:`Sink`), how it is stopped early (:class:`Stopper`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.state import Console, FrameSource, LinkPolicy, Sessions
from r2d2voice.link.turns import TurnGate

__all__ = ["Console", "LinkPolicy", "Sessions", "Sink", "Source", "Stopper"]


class Source(FrameSource, Protocol):
    """Where microphone audio comes from: 960-byte frames of 24 kHz mono PCM16."""

    async def run(self, send: trio.MemorySendChannel[bytes], turns: TurnGate | None) -> None:
        """Send frames until the end of the input; owns ``send`` and closes it. ``turns``: the
        link's turn-taking, for a source that must not talk over the robot (None: the wake
        gate listens, the chain paces)."""

    def set_urgent(self, urgent: bool) -> None:
        """A turn is open, a reply plays or a woken conversation is on (True): deliver frames
        as they come, not batched to save CPU while idle; sources that never batch ignore
        it."""


class Sink(Protocol):
    """Where reply audio goes."""

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        """Play chunks until ``receive`` closes, then drain; owns ``receive``."""


class Stopper:
    """Ends a run early and gracefully (signal or timeout)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._hooks: list[Callable[[], None]] = []

    def on_stop(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)
        if self.reason is not None:
            hook()

    def stop(self, reason: str = "stop") -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for hook in self._hooks:
            hook()
