"""Conversation items as the local backend keeps them: order, lookup, create, truncate."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from r2d2voice.localbackend.mcp import McpPlan
from r2d2voice.localbackend.wire import IdFactory, Json, decode_pcm, is_int, ms, require

__all__ = ["Conversation", "Item", "function_call_item", "parse_item", "system_item",
           "user_audio_item"]

_CONTENT_TYPES = {
    "user": ("input_text", "input_audio"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


@dataclass(eq=False)
class Item:
    """One conversation item."""

    id: str
    role: str
    wire: Json  # the item as sent to the client
    audio_ms: int = 0  # audio held by the item (user input or assistant output)
    text: str | None = None  # text content, or the transcript of the audio
    digest: bytes = b""  # hash of the user's input (audio or text): seeds the reply
    call_id: str | None = None  # function_call and function_call_output items
    name: str | None = None  # function_call items: the tool
    plan: McpPlan | None = None  # mcp_approval_request items: the call it asks for


def _message(item_id: str, role: str, content: list[Json], status: str = "completed") -> Json:
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": status,
            "role": role, "content": content}


def user_audio_item(item_id: str, audio: bytes) -> Item:
    """The user item a committed turn becomes, not transcribed (yet)."""
    wire = _message(item_id, "user", [{"type": "input_audio", "transcript": None}])
    return Item(item_id, "user", wire, ms(len(audio) // 2), None, hashlib.sha256(audio).digest())


def system_item(item_id: str, text: str) -> Item:
    """A system message (the service's note before an idle nudge)."""
    return Item(item_id, "system", _message(item_id, "system", [{"type": "input_text",
                                                                 "text": text}]), text=text)


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> Item:
    wire = {"id": item_id, "object": "realtime.item", "type": "function_call",
            "status": status, "name": name, "call_id": call_id, "arguments": arguments}
    return Item(item_id, "function_call", wire, text=arguments, call_id=call_id, name=name)


def parse_item(raw: Any, new_id: IdFactory) -> Item:
    """The item of a ``conversation.item.create``, or a ClientError."""
    require(isinstance(raw, dict), "Missing required parameter: 'item'.", "item",
            "missing_required_parameter")
    kind = raw.get("type")
    require(kind in ("message", "function_call", "function_call_output",
                     "mcp_approval_response"),
            "Invalid value for 'item.type': the local backend supports 'message', "
            "'function_call', 'function_call_output' and 'mcp_approval_response'.",
            "item.type")
    item_id = raw.get("id")
    if item_id is None:
        item_id = new_id("item")
    require(isinstance(item_id, str) and item_id != "",
            "Invalid type for 'item.id': expected a string.", "item.id")
    if kind == "message":
        return _message_item(raw, item_id)
    if kind == "mcp_approval_response":
        return _approval_response(raw, item_id)
    fields = ("call_id", "name", "arguments") if kind == "function_call" else ("call_id", "output")
    for key in fields:
        require(isinstance(raw.get(key), str), f"Missing required parameter: 'item.{key}'.",
                f"item.{key}", "missing_required_parameter")
    if kind == "function_call":
        return function_call_item(item_id, raw["call_id"], raw["name"], raw["arguments"])
    wire = {"id": item_id, "object": "realtime.item", "type": "function_call_output",
            "status": "completed", "call_id": raw["call_id"], "output": raw["output"]}
    return Item(item_id, "function_call_output", wire, text=raw["output"],
                digest=hashlib.sha256(raw["output"].encode()).digest(), call_id=raw["call_id"])


def _approval_response(raw: Json, item_id: str) -> Item:
    """The client's answer to an ``mcp_approval_request`` (its id is the item's ``call_id``)."""
    require(isinstance(raw.get("approval_request_id"), str),
            "Missing required parameter: 'item.approval_request_id'.",
            "item.approval_request_id", "missing_required_parameter")
    require(isinstance(raw.get("approve"), bool), "Missing required parameter: 'item.approve'.",
            "item.approve", "missing_required_parameter")
    reason = raw.get("reason")
    require(reason is None or isinstance(reason, str),
            "Invalid type for 'item.reason': expected a string.", "item.reason")
    wire = {"id": item_id, "type": "mcp_approval_response",
            "approval_request_id": raw["approval_request_id"], "approve": raw["approve"],
            "reason": reason}
    return Item(item_id, "mcp_approval_response", wire, text=reason,
                call_id=raw["approval_request_id"])


def _message_item(raw: Json, item_id: str) -> Item:
    role = raw.get("role")
    require(role in _CONTENT_TYPES, "Invalid 'item.role': expected user, assistant or system.",
            "item.role")
    content = raw.get("content")
    require(isinstance(content, list) and len(content) > 0,
            "Invalid 'item.content': expected a non-empty array.", "item.content")
    allowed = _CONTENT_TYPES[role]
    wire_content: list[Json] = []
    texts: list[str] = []
    audio_ms = 0
    digest = hashlib.sha256()
    for i, part in enumerate(content):
        p = f"item.content[{i}]"
        require(isinstance(part, dict) and part.get("type") in allowed,
                f"Invalid '{p}.type' for role {role}: expected one of "
                + ", ".join(allowed) + ".", f"{p}.type")
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            require(isinstance(part.get("text"), str),
                    f"Missing required parameter: '{p}.text'.", f"{p}.text",
                    "missing_required_parameter")
            texts.append(part["text"])
            digest.update(part["text"].encode())
            wire_content.append({"type": kind, "text": part["text"]})
            continue
        transcript = part.get("transcript")
        require(transcript is None or isinstance(transcript, str),
                f"Invalid type for '{p}.transcript'.", f"{p}.transcript")
        if "audio" in part:
            pcm = decode_pcm(part["audio"], f"{p}.audio")
            audio_ms += ms(len(pcm) // 2)
            digest.update(pcm)
        if transcript:
            texts.append(transcript)
        wire_content.append({"type": kind, "transcript": transcript})
    return Item(item_id, role, _message(item_id, role, wire_content), audio_ms,
                " ".join(texts) or None, digest.digest())


class Conversation:
    """The items of one session, in order."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def get(self, item_id: str) -> Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    def find(self, item_id: Any, code: str) -> Item:
        """The item ``item_id`` names, or a ClientError with ``code``."""
        require(isinstance(item_id, str), "Missing required parameter: 'item_id'.", "item_id",
                "missing_required_parameter")
        item = self.get(item_id)
        require(item is not None, f"Item with item_id not found: {item_id}", "item_id", code)
        return item  # type: ignore[return-value]

    def last_id(self) -> str | None:
        """The id of the last item (what a new item at the end follows)."""
        return self.items[-1].id if self.items else None

    def insert(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Add ``item`` after ``previous_item_id`` (None: at the end; ``"root"``: first);
        return its predecessor's id."""
        if previous_item_id is None:
            self.items.append(item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            prev = self.get(previous_item_id)
            require(prev is not None, f"Item with item_id not found: {previous_item_id}",
                    "previous_item_id", "item_create_invalid_previous_item_id")
            self.items.insert(self.items.index(prev) + 1, item)  # type: ignore[arg-type]
        index = self.items.index(item)
        return self.items[index - 1].id if index > 0 else None

    def remove(self, item: Item) -> None:
        self.items.remove(item)

    def call(self, call_id: str) -> Item | None:
        """The function_call item with ``call_id``."""
        return next((it for it in self.items
                     if it.role == "function_call" and it.call_id == call_id), None)

    def seed(self) -> bytes:
        """What the next reply's beeps derive from: the last user input or tool output (b"" if
        none)."""
        return next((it.digest for it in reversed(self.items)
                     if it.role in ("user", "function_call_output")), b"")

    def truncate(self, item: Item, content_index: Any, audio_end_ms: Any) -> None:
        """Cut an assistant audio item at ``audio_end_ms``; its transcript leaves the context,
        as with the service."""
        require(is_int(content_index) and content_index == 0,
                "Invalid 'content_index': the item has one content part (0).", "content_index")
        require(item.role == "assistant" and bool(item.wire["content"])
                and item.wire["content"][0].get("type") == "output_audio",
                "Only assistant messages with audio can be truncated.", "item_id",
                "item_truncate_invalid_item_id")
        require(is_int(audio_end_ms) and audio_end_ms >= 0,
                "Invalid 'audio_end_ms': expected a non-negative integer.", "audio_end_ms")
        require(audio_end_ms <= item.audio_ms,
                f"Audio content of {item.audio_ms}ms is already shorter than {audio_end_ms}ms.",
                "audio_end_ms", "invalid_value")
        item.audio_ms = audio_end_ms
        item.text = None
        item.wire["content"][0]["transcript"] = None

    def wire(self, item: Item) -> Json:
        """A copy of ``item`` as the client sees it."""
        return copy.deepcopy(item.wire)
