"""What a response is billed for as input, as the service bills it (sans-IO).

Every response reads the whole context again: the instructions (with the tools' definitions),
then every conversation item still in the context. :class:`ContextWindow` (one per session)
counts it, truncates it as the session's ``truncation`` says, and reports the part of it the
previous response already read as cached — so a long conversation's input grows turn by turn,
mostly cached, until truncation drops old turns (and with them the cached prefix).

Tokens, deterministic: 10 per second of the person's audio, 20 per second of the robot's
(as it was billed out), ``len(text) // 4`` for text (instructions, text items, transcripts of
the robot's audio, function calls and their outputs).

``truncation`` (the GA session field): ``"auto"`` (default) drops the oldest items once the
tokens after the instructions pass :data:`AUTO_LIMIT`, just enough to fit; ``"disabled"``
never drops; ``{"type": "retention_ratio", "retention_ratio": R, "token_limits":
{"post_instructions": N}}`` drops the oldest items once they pass N (the model's limit without
``token_limits``) until R × N remain. Dropped items stay addressable (truncate, delete) but are
no longer read. Cached input is the common prefix with the previous response's input — the
instructions, then the same items in the same order, unchanged; the service caches only
prefixes of 1,024 tokens or more, the local backend every prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.localbackend.items import Item

__all__ = ["AUTO_LIMIT", "Bill", "ContextWindow", "item_tokens"]

#: The model's limit on tokens after the instructions (a 32k context less 4,096 for output).
AUTO_LIMIT = 28_672
USER_AUDIO_TOKENS_PER_S = 10
ASSISTANT_AUDIO_TOKENS_PER_S = 20


@dataclass(frozen=True)
class Bill:
    """One response's input tokens: (audio, text) in all, and how many of each were cached."""

    audio: int
    text: int
    cached_audio: int = 0
    cached_text: int = 0
    #: items truncation dropped before this response read the context
    dropped: int = 0


def item_tokens(item: Item) -> tuple[int, int]:
    """(audio, text) tokens of one item in the context."""
    if item.role == "user":
        if item.audio_ms:
            return item.audio_ms * USER_AUDIO_TOKENS_PER_S // 1000, 0
        return 0, len(item.text or "") // 4
    if item.role == "assistant":
        return (item.audio_ms * ASSISTANT_AUDIO_TOKENS_PER_S // 1000,
                len(item.text or "") // 4)
    return 0, len(item.text or "") // 4


def _limits(truncation: Any) -> tuple[int, float] | None:
    """(post-instruction token limit, share kept) for a ``truncation`` value; None: never."""
    if truncation == "disabled":
        return None
    if isinstance(truncation, dict) and truncation.get("type") == "retention_ratio":
        ratio = truncation.get("retention_ratio")
        limits = truncation.get("token_limits") or {}
        limit = limits.get("post_instructions") if isinstance(limits, dict) else None
        return (limit if isinstance(limit, int) and limit > 0 else AUTO_LIMIT,
                float(ratio) if isinstance(ratio, (int, float)) else 1.0)
    return AUTO_LIMIT, 1.0


@dataclass
class ContextWindow:
    """The context of one session as responses read it (see the module)."""

    #: ids of the items truncation dropped
    dropped: set[str] = field(default_factory=set)
    #: what the previous response read: (key, audio, text) blocks in order
    _previous: list[tuple[str, int, int]] = field(default_factory=list)

    def bill(self, items: Sequence[Item], instructions: str, tools: Any, truncation: Any,
             exclude: Container[str] = ()) -> Bill:
        """The input of a response reading ``items`` now (``exclude``: its own outputs):
        truncates first if the context is over its limit, then counts what is cached."""
        head_text = len(instructions) // 4 + (len(json.dumps(tools)) // 4 if tools else 0)
        head_key = hashlib.sha256(f"{instructions}\0{json.dumps(tools)}".encode()).hexdigest()
        context = [it for it in items if it.id not in self.dropped and it.id not in exclude]
        dropped = self._truncate(context, truncation)
        blocks = [(head_key, 0, head_text)]
        for it in context[dropped:]:
            audio, text = item_tokens(it)
            blocks.append((f"{it.id}:{audio}:{text}", audio, text))
        cached_audio = cached_text = 0
        for now, before in zip(blocks, self._previous, strict=False):
            if now != before:
                break
            cached_audio += now[1]
            cached_text += now[2]
        self._previous = blocks
        return Bill(sum(b[1] for b in blocks), sum(b[2] for b in blocks), cached_audio,
                    cached_text, dropped)

    def biller(self, items: Sequence[Item], session: dict[str, Any]
               ) -> Callable[[Container[str]], Bill]:
        """A reply's ``bill``: what it reads of ``items`` under ``session``'s instructions,
        tools and truncation when it closes (both read then, as they are)."""

        def bill(exclude: Container[str]) -> Bill:
            return self.bill(items, session.get("instructions") or "", session.get("tools"),
                             session.get("truncation"), exclude)

        return bill

    def _truncate(self, context: list[Item], truncation: Any) -> int:
        """Drop the oldest items of ``context`` if it is over the limit; how many."""
        limits = _limits(truncation)
        if limits is None:
            return 0
        limit, ratio = limits
        sizes = [sum(item_tokens(it)) for it in context]
        total = sum(sizes)
        if total <= limit:
            return 0
        keep = ratio * limit
        n = 0
        while n < len(context) - 1 and total > keep:  # the newest item always stays
            total -= sizes[n]
            self.dropped.add(context[n].id)
            n += 1
        return n
