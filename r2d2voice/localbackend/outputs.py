"""The output items of one response: an assistant audio message, a function call, a remote MCP
item (sans-IO).

Each knows the events that open it, stream it and close it, and which of them were sent: a
response cut short closes exactly what the client saw opened, with what it was sent.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from r2d2voice.localbackend.fault_events import obfuscation
from r2d2voice.localbackend.items import Conversation, Item, function_call_item
from r2d2voice.localbackend.mcp import McpPlan, approval_item, call_item
from r2d2voice.localbackend.wire import RATE, EventMaker, Json, ms

__all__ = ["ARGUMENT_PIECE", "AudioMessage", "ChunkMs", "FunctionCall", "McpOutput", "Tick",
           "chunk_bounds"]

ChunkMs = int | tuple[int, int]
"""Audio per delta in ms: fixed, or (shortest, longest) varied deterministically."""

ARGUMENT_PIECE = 7
"""Characters of a function call's arguments per ``function_call_arguments.delta``."""


@dataclass(frozen=True)
class Tick:
    """The next step is due ``at_ms`` of audio after the response's first audio chunk."""

    at_ms: int


def chunk_bounds(n_samples: int, chunk_ms: ChunkMs) -> list[tuple[int, int]]:
    """Sample ranges of the audio deltas of ``n_samples`` of audio (at least one)."""
    lo, hi = (chunk_ms, chunk_ms) if isinstance(chunk_ms, int) else chunk_ms
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < n_samples or not bounds:
        size_ms = lo + (len(bounds) * 7919) % (hi - lo + 1)  # a fixed spread over lo..hi
        end = min(start + max(1, RATE * size_ms // 1000), n_samples)
        bounds.append((start, end))
        start = end
    return bounds


class _Output:
    """What both kinds share: the two ``added`` events, the sent set, the closing events."""

    def __init__(self, event: EventMaker, conversation: Conversation, response_id: str,
                 output_index: int, *, extra: bool) -> None:
        self._event = event
        self._conversation = conversation
        self.response_id = response_id
        self.output_index = output_index
        self.item_id = event.new_id("item")
        self.extra = extra
        self.sent_types: set[str] = set()
        self.item: Item | None = None
        self.status = "in_progress"
        self._previous: str | None = None

    @property
    def started(self) -> bool:
        return "response.output_item.added" in self.sent_types

    def wire(self, status: str) -> Json:
        raise NotImplementedError

    def _new_item(self) -> Item:
        raise NotImplementedError

    def _content_done(self) -> list[tuple[str, Callable[[], Json]]]:
        return []

    def _added(self) -> Iterator[Json]:
        yield self._event("response.output_item.added", response_id=self.response_id,
                          output_index=self.output_index, item=self.wire("in_progress"))
        self._previous = self._conversation.last_id()
        yield self._event("conversation.item.added", previous_item_id=self._previous,
                          item=self.wire("in_progress"))

    def sent(self, event: Json) -> None:
        self.sent_types.add(event["type"])
        if event["type"] == "conversation.item.added":
            self.item = self._new_item()
            self._conversation.insert(self.item)

    def closing(self, status: str) -> list[Json]:
        """The events still due to close this output with item ``status`` (none if it never
        started); the conversation's copy of the item takes its final form."""
        if not self.started:
            return []
        self.status = status
        wire = self.wire(status)
        due = [*self._content_done(), (
            "response.output_item.done",
            lambda: self._event("response.output_item.done", response_id=self.response_id,
                                output_index=self.output_index, item=copy.deepcopy(wire)))]
        if "conversation.item.added" in self.sent_types:
            due.append(("conversation.item.done", lambda: self._event(
                "conversation.item.done", previous_item_id=self._previous,
                item=copy.deepcopy(wire))))
            if self.item is not None:
                self.item.wire = copy.deepcopy(wire)
        return [make() for type_, make in due if type_ not in self.sent_types]

    def _ids(self) -> Json:
        return {"response_id": self.response_id, "item_id": self.item_id,
                "output_index": self.output_index}


class AudioMessage(_Output):
    """An assistant message with audio and its transcript; ``phase`` (extra_fields):
    ``commentary`` for a preamble before a call, else ``final_answer``."""

    def __init__(self, *args: object, phase: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.phase = phase
        self.bytes_sent = 0
        self.transcript_sent = ""

    def opening(self) -> Iterator[Json]:
        yield from self._added()
        yield self._event("response.content_part.added", **self._ids(), content_index=0,
                          part={"type": "audio", "transcript": ""})

    def chunks(self, audio: bytes, transcript: str, chunk_ms: ChunkMs) -> Iterator[Json | Tick]:
        """Per chunk: a :class:`Tick`, an audio delta and maybe a transcript delta (the
        transcript's words spread over the chunks)."""
        bounds = chunk_bounds(len(audio) // 2, chunk_ms)
        words = transcript.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        per_chunk: list[list[str]] = [[] for _ in bounds]
        for i, piece in enumerate(pieces):
            per_chunk[i * len(bounds) // len(pieces)].append(piece)
        for (start, end), text in zip(bounds, per_chunk, strict=True):
            yield Tick(ms(start))
            if end > start:
                yield self._event("response.output_audio.delta", **self._ids(), content_index=0,
                                  delta=base64.b64encode(audio[2 * start : 2 * end]).decode())
            if text:
                delta = "".join(text)
                extra = {"obfuscation": obfuscation(delta)} if self.extra else {}
                yield self._event("response.output_audio_transcript.delta", **self._ids(),
                                  content_index=0, delta=delta, **extra)

    def sent(self, event: Json) -> None:
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
            super().sent(event)

    def wire(self, status: str) -> Json:
        content = []
        if "response.content_part.added" in self.sent_types:
            content = [{"type": "output_audio", "transcript": self.transcript_sent}]
        extra = {"phase": self.phase} if self.extra else {}
        return {"id": self.item_id, "object": "realtime.item", "type": "message",
                "status": status, "role": "assistant", "content": content, **extra}

    def _new_item(self) -> Item:
        return Item(self.item_id, "assistant", self.wire("in_progress"))

    def _content_done(self) -> list[tuple[str, Callable[[], Json]]]:
        if "response.content_part.added" not in self.sent_types:
            return []
        ids = {**self._ids(), "content_index": 0}
        text = self.transcript_sent
        return [
            ("response.output_audio.done",
             lambda: self._event("response.output_audio.done", **ids)),
            ("response.output_audio_transcript.done",
             lambda: self._event("response.output_audio_transcript.done", **ids,
                                 transcript=text)),
            ("response.content_part.done",
             lambda: self._event("response.content_part.done", **ids,
                                 part={"type": "audio", "transcript": text})),
        ]


class FunctionCall(_Output):
    """A ``function_call`` item whose arguments stream in pieces."""

    def __init__(self, *args: object, name: str, arguments: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.call_id = self._event.new_id("call")
        self.name = name
        self.arguments = arguments
        self.arguments_sent = ""

    def opening(self) -> Iterator[Json]:
        yield from self._added()

    def deltas(self) -> Iterator[Json]:
        text = self.arguments
        for i in range(0, len(text), ARGUMENT_PIECE):
            piece = text[i : i + ARGUMENT_PIECE]
            extra = {"obfuscation": obfuscation(piece)} if self.extra else {}
            yield self._event("response.function_call_arguments.delta", **self._ids(),
                              call_id=self.call_id, delta=piece, **extra)

    def sent(self, event: Json) -> None:
        if event["type"] == "response.function_call_arguments.delta":
            self.arguments_sent += event["delta"]
            if self.item is not None:
                self.item.text = self.arguments_sent
        else:
            super().sent(event)

    def wire(self, status: str) -> Json:
        return function_call_item(self.item_id, self.call_id, self.name, self.arguments_sent,
                                  status).wire

    def _new_item(self) -> Item:
        return function_call_item(self.item_id, self.call_id, self.name, "", "in_progress")

    def _content_done(self) -> list[tuple[str, Callable[[], Json]]]:
        if self.arguments_sent != self.arguments:
            return []  # cut short: the arguments were never final
        return [("response.function_call_arguments.done", lambda: self._event(
            "response.function_call_arguments.done", **self._ids(), call_id=self.call_id,
            name=self.name, arguments=self.arguments))]


class McpOutput(_Output):
    """A remote MCP item: an ``mcp_approval_request`` (``ask``: the service asks before the
    call), or the ``mcp_call`` the service made — its arguments, in progress, then completed
    or failed with what the script says the server answered."""

    def __init__(self, *args: object, plan: McpPlan, ask: bool,
                 approval_request_id: str | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.item_id = self._event.new_id("mcpr" if ask else "mcp")
        self.plan = plan
        self.ask = ask
        self.approval_request_id = approval_request_id

    def opening(self) -> Iterator[Json]:
        yield from self._added()

    def steps(self) -> Iterator[Json]:
        """The call's events between its ``added`` and its ``done`` (an approval request has
        none)."""
        if self.ask:
            return
        arguments = self.plan.arguments
        yield self._event("response.mcp_call_arguments.delta", **self._ids(), delta=arguments)
        yield self._event("response.mcp_call_arguments.done", **self._ids(),
                          arguments=arguments)
        yield self._event("response.mcp_call.in_progress", item_id=self.item_id,
                          output_index=self.output_index)

    def wire(self, status: str) -> Json:
        if self.ask:
            return approval_item(self.item_id, self.plan)
        return call_item(self.item_id, self.plan, self.approval_request_id,
                         done=status == "completed")

    def _new_item(self) -> Item:
        kind = "mcp_approval_request" if self.ask else "mcp_call"
        return Item(self.item_id, kind, self.wire("in_progress"), text=self.plan.arguments,
                    name=self.plan.tool, plan=self.plan)

    def _content_done(self) -> list[tuple[str, Callable[[], Json]]]:
        if "response.mcp_call.in_progress" not in self.sent_types:
            return []
        kind = ("response.mcp_call.failed" if self.plan.error is not None
                else "response.mcp_call.completed")
        return [(kind, lambda: self._event(kind, item_id=self.item_id,
                                           output_index=self.output_index))]
