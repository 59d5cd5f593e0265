"""One thing the local GPT-Live model says: beeps on the session timeline (sans-IO).

The shell streams a :class:`LiveReply` like a Realtime reply: :meth:`LiveReply.steps` over the
beeps of :func:`~r2d2voice.localbackend.reply.synthesize`, paced by :class:`Tick` markers,
reporting each event sent with :meth:`LiveReply.sent`. Each chunk is an
``session.output_audio.delta`` (no timestamps, as on a primary websocket) preceded by the
``session.output_transcript.delta`` of the words it carries, placed on the timeline from
``at_ms``, where the reply begins.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

from r2d2voice.localbackend.outputs import ChunkMs, Tick, chunk_bounds
from r2d2voice.localbackend.reply import Beeps
from r2d2voice.localbackend.wire import EventMaker, Json, ms

__all__ = ["LiveReply", "words"]


def words(text: str) -> list[str]:
    """``text`` in pieces (a word and the spaces after it) that concatenate back to it."""
    return re.findall(r"\s*\S+\s*", text) or [text]


class LiveReply:
    """The robot saying ``say`` (None: what the beeps say) from timeline ms ``at_ms`` for
    ``seconds``; ``seed`` picks the beeps."""

    def __init__(self, event: EventMaker, *, at_ms: int, seed: bytes, seconds: float,
                 say: str | None = None) -> None:
        self._event = event
        self.at_ms = at_ms
        self.seed = seed
        self.seconds = seconds
        self.say = say
        self.hushed = False  # the person talked over it: it stopped
        self.audio_ms = 0  # audio sent so far
        self.transcript = ""  # words sent so far

    @property
    def end_ms(self) -> int:
        """Where on the timeline what it said so far ends."""
        return self.at_ms + self.audio_ms

    def spans(self, position_ms: int) -> bool:
        """Whether timeline ms ``position_ms`` falls inside what it is saying."""
        return self.at_ms <= position_ms < self.at_ms + round(self.seconds * 1000)

    def steps(self, beeps: Beeps, chunk_ms: ChunkMs) -> Iterator[Json | Tick]:
        """Per chunk: a :class:`Tick`, the transcript of its words, its audio."""
        audio, default = beeps
        bounds = chunk_bounds(len(audio) // 2, chunk_ms)
        pieces = words(default if self.say is None else self.say)
        per_chunk: list[list[str]] = [[] for _ in bounds]
        for i, piece in enumerate(pieces):
            per_chunk[i * len(bounds) // len(pieces)].append(piece)
        for (start, end), text in zip(bounds, per_chunk, strict=True):
            yield Tick(ms(start))
            if text:
                yield self._event("session.output_transcript.delta", delta="".join(text),
                                  start_ms=self.at_ms + ms(start), end_ms=self.at_ms + ms(end))
            if end > start:
                yield self._event("session.output_audio.delta",
                                  delta=base64.b64encode(audio[2 * start : 2 * end]).decode())

    def sent(self, event: Json) -> None:
        """``event`` of :meth:`steps` went out."""
        if event["type"] == "session.output_audio.delta":
            self.audio_ms += ms(len(base64.b64decode(event["delta"])) // 2)
        elif event["type"] == "session.output_transcript.delta":
            self.transcript += event["delta"]
