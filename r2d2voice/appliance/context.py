"""The shapes of a run's parts: what its tasks share (:data:`Context`), where microphone audio
comes from (:class:`Source`), where reply audio goes (:class:`Sink`), how it is stopped early
(:class:`Stopper`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.state import Console, FrameSource, LinkPolicy, LinkState, Sessions

__all__ = ["Console", "Context", "LinkPolicy", "Sessions", "Sink", "Source", "Stopper"]

#: What the tasks of one run share: the current session's conversation, the playout buffer,
#: counters, the connection epoch. The link keeps it up to date; sources watch it.
Context = LinkState


class Source(FrameSource, Protocol):
    """Where microphone audio comes from: 960-byte frames of 24 kHz mono PCM16."""

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        """Send frames until the end of the input; owns ``send`` and closes it."""

    def set_urgent(self, urgent: bool) -> None:
        """A conversation is open (True): deliver frames as they come, not batched to save CPU
        while idle. The wake-word listener says it; sources that never batch ignore it."""


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
