"""Client events of the GPT-Live protocol as small typed records, and their JSON form.

Every event the appliance sends on a Live websocket is one of the frozen records below;
:func:`encode` is the one place where a record becomes wire JSON (field names as
``openai.types.live.ClientEvent``; the service is strict and rejects unknown fields). Event ids
are not part of a record: the :class:`~r2d2voice.live.conversation.LiveConversation` that sends
one assigns them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

#: The one audio format on the wire: PCM16 mono little-endian at 24 kHz (both directions).
RATE = 24000
DEFAULT_MODEL = "gpt-live-1"
DEFAULT_VOICE = "marin"
#: The Responses model the Live session hands tool work to (``delegation.responses.model``).
DEFAULT_DELEGATE_MODEL = "gpt-5.5"
DEFAULT_DELEGATE_INSTRUCTIONS = (
    "You act for R2, a small robot talking with people in a home. Use the tools when the "
    "request needs them, then answer in one short plain sentence that R2 can say aloud."
)
#: ``session.input``: at most this many messages (the service's limit) ...
MAX_INITIAL_ITEMS = 128
#: ... and about this much text (8,192 rendered tokens by default; ~4 characters a token)
MAX_INITIAL_CHARS = 24_000
#: thinking / commentary content is capped at 500 tokens: clipped to about that many characters
MAX_APPEND_CHARS = 1_800
#: roles an initial item may have
HISTORY_ROLES = ("user", "assistant", "developer")
#: keys of a function tool that Live's Responses delegation accepts (others are left out)
_TOOL_KEYS = ("type", "name", "description", "parameters", "strict")


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """What ``session.start`` asks of the service; immutable for the session's life.

    ``tools``: function tools (the Realtime GA shape, ``{"type": "function", "name", ...}``);
    with any, tool work is delegated to ``delegate_model`` through Responses delegation (the
    calls come back to the appliance to run). ``history``: (role, text) messages the session
    starts with (``session.input``), oldest first.
    """

    instructions: str
    model: str = DEFAULT_MODEL
    voice: str = DEFAULT_VOICE
    tools: tuple[dict[str, Any], ...] = ()
    delegate_model: str = DEFAULT_DELEGATE_MODEL
    delegate_instructions: str = DEFAULT_DELEGATE_INSTRUCTIONS
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        bad = [role for role, _ in self.history if role not in HISTORY_ROLES]
        if bad:
            raise ValueError(f"history roles must be one of {HISTORY_ROLES}, not {bad[0]!r}")

    def with_history(self, messages: list[tuple[str, str]] | tuple[tuple[str, str], ...]
                     ) -> LiveConfig:
        """This configuration starting from ``messages`` (oldest first; empty texts dropped):
        the newest that fit the service's limits (:data:`MAX_INITIAL_ITEMS`,
        :data:`MAX_INITIAL_CHARS`)."""
        kept: list[tuple[str, str]] = []
        chars = 0
        for role, text in reversed([m for m in messages if m[1].strip()]):
            chars += len(text)
            if len(kept) == MAX_INITIAL_ITEMS or chars > MAX_INITIAL_CHARS:
                break
            kept.append((role, text))
        return replace(self, history=tuple(reversed(kept)))


@dataclass(frozen=True, slots=True)
class SessionStart:
    """``session.start``: the first event of every connection."""

    TYPE: ClassVar[str] = "session.start"

    config: LiveConfig


@dataclass(frozen=True, slots=True)
class AudioAppend:
    """``session.input_audio.append`` of 24 kHz mono PCM16 (there is no commit: the model
    endpoints by itself)."""

    TYPE: ClassVar[str] = "session.input_audio.append"

    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ThinkingAppend:
    """``session.thinking.append``: silent context (for a client delegation, or general)."""

    TYPE: ClassVar[str] = "session.thinking.append"

    content: str
    delegation_id: str | None = None


@dataclass(frozen=True, slots=True)
class CommentaryAppend:
    """``session.commentary.append``: context the model says to the user (the answer to a
    client delegation, or general)."""

    TYPE: ClassVar[str] = "session.commentary.append"

    content: str
    delegation_id: str | None = None


@dataclass(frozen=True, slots=True)
class FunctionOutput:
    """``response.item.create`` of a ``function_call_output``: a tool's answer to the
    delegated Responses model."""

    TYPE: ClassVar[str] = "response.item.create"

    call_id: str
    output: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ResponseCreate:
    """``response.create``: the delegated response waiting for tool results goes on."""

    TYPE: ClassVar[str] = "response.create"


@dataclass(frozen=True, slots=True)
class SessionClose:
    """``session.close``: the service answers ``session.closed`` with the final usage."""

    TYPE: ClassVar[str] = "session.close"


ClientEvent = (
    SessionStart | AudioAppend | ThinkingAppend | CommentaryAppend | FunctionOutput
    | ResponseCreate | SessionClose
)


def clip(text: str, limit: int = MAX_APPEND_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks a cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _item(role: str, text: str) -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", **{k: tool[k] for k in _TOOL_KEYS[1:] if k in tool}}


def session_config(cfg: LiveConfig) -> dict[str, Any]:
    """The ``session`` object of ``session.start`` for ``cfg``."""
    session: dict[str, Any] = {"model": cfg.model}
    if cfg.instructions.strip():
        session["instructions"] = cfg.instructions
    session["audio"] = {"format": {"type": "audio/pcm", "rate": RATE},
                        "output": {"voice": cfg.voice}}
    if cfg.tools:
        session["delegation"] = {"type": "responses", "responses": {
            "model": cfg.delegate_model, "instructions": cfg.delegate_instructions,
            "tools": [_tool(t) for t in cfg.tools], "tool_choice": "auto",
            "parallel_tool_calls": True,
        }}
    if cfg.history:
        session["input"] = [_item(role, text) for role, text in cfg.history]
    return session


def to_dict(event: ClientEvent, event_id: str) -> dict[str, Any]:
    """The wire form of ``event`` as a dict: ``type``, ``event_id``, then its body."""
    body: dict[str, Any]
    match event:
        case SessionStart(config=cfg):
            body = {"session": session_config(cfg)}
        case AudioAppend(pcm=pcm):
            body = {"audio": base64.b64encode(pcm).decode("ascii")}
        case ThinkingAppend(content=content, delegation_id=did) | CommentaryAppend(
                content=content, delegation_id=did):
            body = {"content": clip(content), "delegation_id": did}
        case FunctionOutput(call_id=call_id, output=output):
            body = {"item": {"type": "function_call_output", "call_id": call_id,
                             "output": output}}
        case ResponseCreate() | SessionClose():
            body = {}
        case _:
            raise TypeError(f"not a Live client event: {event!r}")
    return {"type": event.TYPE, "event_id": event_id, **body}


def encode(event: ClientEvent, event_id: str) -> str:
    """``event`` as one compact JSON text frame."""
    return json.dumps(to_dict(event, event_id), separators=(",", ":"), ensure_ascii=False)
