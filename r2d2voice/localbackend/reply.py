"""One response: the events it is made of, what of it was sent, and how it ends (sans-IO).

The shell streams a :class:`Reply` in three steps: :meth:`Reply.opening` (four events), then
:meth:`Reply.chunks` over the audio from :func:`synthesize` (paced by :class:`Tick` markers),
reporting every event it sent with :meth:`Reply.sent`; at the end, or once cancelled,
:meth:`Reply.closing` closes whatever was opened, from what was actually sent.
"""

from __future__ import annotations

import base64
import copy
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.localbackend.items import Conversation, Item
from r2d2voice.localbackend.wire import RATE, EventMaker, Json, ms

__all__ = ["Beeps", "Reply", "Tick", "synthesize"]

Beeps = tuple[bytes, str]
"""A reply's PCM16 audio and its transcript."""


@functools.lru_cache(maxsize=16)
def synthesize(seed: bytes, seconds: float) -> Beeps:
    """The beeps for ``seed`` (cached: the same input gets the same reply, computed once).

    numpy work of ~0.6 ms per second of audio on a desktop core, tens of ms on a small board:
    the server runs it in a worker thread.
    """
    audio, transcript = r2_reply(seed, seconds, RATE)
    return audio.astype("<i2").tobytes(), transcript


@dataclass(frozen=True)
class Tick:
    """Audio chunk ``index`` starts here: due ``index`` chunk durations after chunk 0."""

    index: int


class Reply:
    """One response, from ``response.created`` to ``response.done``."""

    OPENING = 4  # response.created, output_item.added, conversation.item.added, part.added

    def __init__(
        self,
        event: EventMaker,
        conversation: Conversation,
        *,
        conversation_id: str,
        voice: Any,
        instructions: str,
        seed: bytes,
        seconds: float,
        metadata: Any = None,
    ) -> None:
        self._event = event
        self._conversation = conversation
        self.id = event.new_id("resp")
        self.item_id = event.new_id("item")
        self.conversation_id = conversation_id
        self.voice = voice
        self.instructions = instructions
        self.seed = seed
        self.seconds = seconds
        self.metadata = metadata
        self.cancel_reason: str | None = None
        self.stage = 0  # opening events sent
        self.bytes_sent = 0
        self.transcript_sent = ""
        self.item: Item | None = None
        self._previous: str | None = None

    def cancel(self, reason: str) -> None:
        """From now on the reply is cancelled (``turn_detected`` or ``client_cancelled``)."""
        self.cancel_reason = reason

    # -- events ------------------------------------------------------------------------

    def opening(self) -> Iterator[Json]:
        """``response.created`` … ``response.content_part.added``."""
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.output_item.added", response_id=self.id, output_index=0,
                          item=self._wire_item("in_progress"))
        self._previous = self._conversation.last_id()
        yield self._event("conversation.item.added", previous_item_id=self._previous,
                          item=self._wire_item("in_progress"))
        yield self._event("response.content_part.added", **self._ids(),
                          part={"type": "audio", "transcript": ""})

    def chunks(self, beeps: Beeps, chunk_samples: int) -> Iterator[Json | Tick]:
        """Per chunk: a :class:`Tick`, an audio delta and maybe a transcript delta (the
        transcript's words spread over the chunks)."""
        audio, transcript = beeps
        chunk_bytes = 2 * chunk_samples
        n_chunks = max(1, math.ceil(len(audio) / chunk_bytes))
        words = transcript.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        per_chunk: list[list[str]] = [[] for _ in range(n_chunks)]
        for i, piece in enumerate(pieces):
            per_chunk[i * n_chunks // len(pieces)].append(piece)
        for j in range(n_chunks):
            yield Tick(j)
            chunk = audio[j * chunk_bytes : (j + 1) * chunk_bytes]
            if chunk:
                yield self._event("response.output_audio.delta", **self._ids(),
                                  delta=base64.b64encode(chunk).decode("ascii"))
            if per_chunk[j]:
                yield self._event("response.output_audio_transcript.delta", **self._ids(),
                                  delta="".join(per_chunk[j]))

    def sent(self, event: Json) -> None:
        """``event`` (from :meth:`opening` or :meth:`chunks`) went out: the client knows it."""
        type_ = event["type"]
        if type_ == "response.output_audio.delta":
            self.bytes_sent += len(base64.b64decode(event["delta"]))
            if self.item is not None:
                self.item.audio_ms = ms(self.bytes_sent // 2)
        elif type_ == "response.output_audio_transcript.delta":
            self.transcript_sent += event["delta"]
            if self.item is not None:
                self.item.text = self.transcript_sent
        else:
            self.stage += 1
            if type_ == "conversation.item.added":
                self.item = Item(self.item_id, "assistant", self._wire_item("in_progress"))
                self._conversation.insert(self.item)

    def closing(self) -> list[Json]:
        """The events that end the response, given what was sent and whether it was cancelled:
        the ``done`` of each part opened, then ``response.done`` with usage."""
        cancelled = self.cancel_reason is not None
        item_status = "incomplete" if cancelled else "completed"
        out: list[Json] = []
        if self.stage == 0:
            out.append(self._event("response.created",
                                   response=self._response("in_progress", [], None)))
        if self.stage >= 4:
            part = {"type": "audio", "transcript": self.transcript_sent}
            out += [
                self._event("response.output_audio.done", **self._ids()),
                self._event("response.output_audio_transcript.done", **self._ids(),
                            transcript=self.transcript_sent),
                self._event("response.content_part.done", **self._ids(), part=part),
            ]
        output: list[Json] = []
        if self.stage >= 2:
            wire = self._wire_item(item_status)
            output = [wire]
            out.append(self._event("response.output_item.done", response_id=self.id,
                                   output_index=0, item=wire))
            if self.stage >= 3 and self.item is not None:
                self.item.wire = copy.deepcopy(wire)
                out.append(self._event("conversation.item.done", previous_item_id=self._previous,
                                       item=copy.deepcopy(wire)))
        status = "cancelled" if cancelled else "completed"
        out.append(self._event("response.done",
                               response=self._response(status, output, self.usage())))
        return out

    def usage(self) -> Json:
        """Synthetic, deterministic usage: input as :meth:`Conversation.input_usage`; output
        20 audio tokens per second of audio sent and len(transcript sent) // 4 text tokens."""
        in_audio, in_text = self._conversation.input_usage(self.instructions, self.item_id)
        out_audio = self.bytes_sent // 2 * 20 // RATE
        out_text = len(self.transcript_sent) // 4
        return {
            "total_tokens": in_audio + in_text + out_audio + out_text,
            "input_tokens": in_audio + in_text,
            "output_tokens": out_audio + out_text,
            "input_token_details": {
                "text_tokens": in_text, "audio_tokens": in_audio, "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        }

    # -- builders ----------------------------------------------------------------------

    def _response(self, status: str, output: list[Json], usage: Json | None) -> Json:
        details: Json | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif status == "completed":
            details = {"type": "completed"}
        return {
            "object": "realtime.response", "id": self.id, "status": status,
            "status_details": details, "output": output,
            "conversation_id": self.conversation_id, "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE},
                                 "voice": copy.deepcopy(self.voice)}},
            "usage": usage, "metadata": self.metadata,
        }

    def _wire_item(self, status: str) -> Json:
        content = []
        if self.stage >= self.OPENING:
            content = [{"type": "output_audio", "transcript": self.transcript_sent}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message",
                "status": status, "role": "assistant", "content": content}

    def _ids(self) -> Json:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0,
                "content_index": 0}
