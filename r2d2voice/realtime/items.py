"""The items of one session in conversation order (sans-IO): each item's ``seq``, given when it
is first seen, and what each reply has said and streamed so far."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from r2d2voice.protocol.actions import StoreMessage
from r2d2voice.realtime.tracking import remember


@dataclass
class Reply:
    response_id: str | None
    seq: int
    text: list[str] = field(default_factory=list)
    audio_samples: int = 0
    done: bool = False
    #: no more audio of it comes (told once: :meth:`Items.audio_over`)
    audio_over: bool = False


class Items:
    """Sequence numbers (1, 2, 3, … per session) and replies, both bounded."""

    def __init__(self) -> None:
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._last_seq = 0
        self._replies: OrderedDict[str, Reply] = OrderedDict()

    def seq(self, item_id: str) -> int:
        """The item's place in the conversation, given when it is first seen."""
        seq = self._seqs.get(item_id)
        if seq is None:
            self._last_seq += 1
            seq = self._last_seq
            remember(self._seqs, item_id, seq)
        return seq

    def seq_of(self, item_id: str) -> int | None:
        return self._seqs.get(item_id)

    def reply(self, item_id: str, response_id: str | None) -> Reply:
        """The reply item ``item_id`` (made, and given its seq, when first seen)."""
        reply = self._replies.get(item_id)
        if reply is None:
            reply = Reply(response_id, self.seq(item_id))
            remember(self._replies, item_id, reply)
        elif reply.response_id is None:
            reply.response_id = response_id
        return reply

    def known_reply(self, item_id: str) -> Reply | None:
        return self._replies.get(item_id)

    def unfinished(self, response_id: str | None = None) -> Iterator[StoreMessage]:
        """What replies (of ``response_id``, or all) said without their ``.done``: stored as
        partial transcripts, once."""
        for item_id, reply in self._replies.items():
            if response_id is not None and reply.response_id != response_id:
                continue
            if not reply.done and reply.text:
                reply.done = True
                yield StoreMessage("assistant", item_id, reply.seq, "".join(reply.text),
                                   reply.response_id, partial=True)

    def audio_over(self, response_id: str | None = None) -> list[str]:
        """Replies (of ``response_id``, or all) that streamed audio and whose audio is now over,
        each named once."""
        over = []
        for item_id, reply in self._replies.items():
            if response_id is not None and reply.response_id != response_id:
                continue
            if reply.audio_samples and not reply.audio_over:
                reply.audio_over = True
                over.append(item_id)
        return over

    def tracked(self) -> tuple[int, int]:
        """(items with a seq, replies) remembered now."""
        return len(self._seqs), len(self._replies)
