"""Client events of the GA Realtime protocol as small typed records, and their JSON form.

Every event the appliance sends is one of the frozen records below; :func:`encode` is the one
place where a record becomes wire JSON. Event ids are not part of a record: the
:class:`~r2d2voice.realtime.conversation.Conversation` that sends it assigns them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: The one audio format on the wire: PCM16 mono little-endian at 24 kHz.
RATE = 24000


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What ``session.update`` asks of the service."""

    instructions: str
    voice: str = "alloy"
    transcribe_model: str = "gpt-4o-transcribe"
    vad_threshold: float = 0.5
    vad_prefix_ms: int = 300
    vad_silence_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    #: keep this share of the context when it overflows (``truncation.retention_ratio``)
    retention_ratio: float | None = None
    #: conversation tokens (after instructions) that trigger truncation; None: model default
    token_limit: int | None = None
    #: function tools offered to the model (GA ``tools`` entries); none: no ``tools`` sent
    tools: tuple[dict[str, Any], ...] = ()
    #: no speech this long makes the service nudge the user (``idle_timeout_ms``); None: off
    idle_timeout_ms: int | None = None
    #: the longest reply in tokens (``max_output_tokens``, 1..4096); None: not sent ("inf")
    max_output_tokens: int | None = None
    #: ``audio.input.noise_reduction.type``: near_field, far_field; None: none asked for
    noise_reduction: str | None = None
    #: ``server_vad`` (the threshold and timings above) or ``semantic_vad`` (``eagerness``)
    turn_detection: str = "server_vad"
    eagerness: str = "auto"


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """``session.update`` in the GA shape."""

    TYPE: ClassVar[str] = "session.update"

    config: SessionConfig


@dataclass(frozen=True, slots=True)
class AudioAppend:
    """``input_audio_buffer.append`` of 24 kHz mono PCM16 audio."""

    TYPE: ClassVar[str] = "input_audio_buffer.append"

    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AudioCommit:
    """``input_audio_buffer.commit``."""

    TYPE: ClassVar[str] = "input_audio_buffer.commit"


@dataclass(frozen=True, slots=True)
class AudioClear:
    """``input_audio_buffer.clear``."""

    TYPE: ClassVar[str] = "input_audio_buffer.clear"


@dataclass(frozen=True, slots=True)
class ItemCreateText:
    """``conversation.item.create`` of a text message (context carried to a new session)."""

    TYPE: ClassVar[str] = "conversation.item.create"

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class ItemCreateFunctionOutput:
    """``conversation.item.create`` of a ``function_call_output``: a tool's answer."""

    TYPE: ClassVar[str] = "conversation.item.create"

    call_id: str
    output: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ItemCreateMcpApproval:
    """``conversation.item.create`` of an ``mcp_approval_response``: the answer to the service's
    request to call a remote MCP tool."""

    TYPE: ClassVar[str] = "conversation.item.create"

    item_id: str
    approval_request_id: str
    approve: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ToolsUpdate:
    """``session.update`` of the ``tools`` alone (their list changed mid-session)."""

    TYPE: ClassVar[str] = "session.update"

    tools: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class ItemTruncate:
    """``conversation.item.truncate``: the service keeps only what the user heard."""

    TYPE: ClassVar[str] = "conversation.item.truncate"

    item_id: str
    audio_end_ms: int
    content_index: int = 0


@dataclass(frozen=True, slots=True)
class ItemDelete:
    """``conversation.item.delete``."""

    TYPE: ClassVar[str] = "conversation.item.delete"

    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseCreate:
    """``response.create``."""

    TYPE: ClassVar[str] = "response.create"


@dataclass(frozen=True, slots=True)
class ResponseCancel:
    """``response.cancel`` (of ``response_id``, or of the active response)."""

    TYPE: ClassVar[str] = "response.cancel"

    response_id: str | None = None


ClientEvent = (
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreateText
    | ItemCreateFunctionOutput | ItemTruncate | ItemDelete | ResponseCreate | ResponseCancel
    | ItemCreateMcpApproval | ToolsUpdate
)


def _session(cfg: SessionConfig) -> dict[str, Any]:
    pcm = {"type": "audio/pcm", "rate": RATE}
    turn_detection: dict[str, Any] = {"type": cfg.turn_detection}
    if cfg.turn_detection == "semantic_vad":
        turn_detection["eagerness"] = cfg.eagerness
    else:
        turn_detection.update(threshold=cfg.vad_threshold, prefix_padding_ms=cfg.vad_prefix_ms,
                              silence_duration_ms=cfg.vad_silence_ms)
    turn_detection.update(create_response=cfg.create_response,
                          interrupt_response=cfg.interrupt_response)
    if cfg.idle_timeout_ms is not None and cfg.turn_detection == "server_vad":
        turn_detection["idle_timeout_ms"] = cfg.idle_timeout_ms
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": cfg.instructions,
        "audio": {
            "input": {
                "format": pcm,
                "transcription": {"model": cfg.transcribe_model},
                "turn_detection": turn_detection,
                **({"noise_reduction": {"type": cfg.noise_reduction}}
                   if cfg.noise_reduction else {}),
            },
            "output": {"format": dict(pcm), "voice": cfg.voice},
        },
    }
    if cfg.retention_ratio is not None:
        truncation: dict[str, Any] = {"type": "retention_ratio",
                                      "retention_ratio": cfg.retention_ratio}
        if cfg.token_limit:
            truncation["token_limits"] = {"post_instructions": cfg.token_limit}
        session["truncation"] = truncation
    if cfg.max_output_tokens is not None:
        session["max_output_tokens"] = cfg.max_output_tokens
    if cfg.tools:
        session["tools"] = [dict(tool) for tool in cfg.tools]
        session["tool_choice"] = "auto"
    return session


def to_dict(event: ClientEvent, event_id: str) -> dict[str, Any]:
    """The wire form of ``event`` as a dict: ``type``, ``event_id``, then its body."""
    body: dict[str, Any]
    match event:
        case SessionUpdate(config=cfg):
            body = {"session": _session(cfg)}
        case AudioAppend(pcm=pcm):
            body = {"audio": base64.b64encode(pcm).decode("ascii")}
        case ItemCreateText(role=role, text=text):
            part = "output_text" if role == "assistant" else "input_text"
            body = {"item": {"type": "message", "role": role,
                             "content": [{"type": part, "text": text}]}}
        case ItemCreateFunctionOutput(call_id=call_id, output=output):
            body = {"item": {"type": "function_call_output", "call_id": call_id,
                             "output": output}}
        case ItemCreateMcpApproval(item_id=item_id, approval_request_id=request, approve=yes,
                                   reason=reason):
            item = {"type": "mcp_approval_response", "id": item_id,
                    "approval_request_id": request, "approve": yes}
            body = {"item": item if reason is None else {**item, "reason": reason}}
        case ToolsUpdate(tools=tools):
            body = {"session": {"type": "realtime", "tools": [dict(t) for t in tools],
                                "tool_choice": "auto"}}
        case ItemTruncate(item_id=item_id, audio_end_ms=end, content_index=index):
            body = {"item_id": item_id, "content_index": index, "audio_end_ms": end}
        case ItemDelete(item_id=item_id):
            body = {"item_id": item_id}
        case ResponseCancel(response_id=rid):
            body = {} if rid is None else {"response_id": rid}
        case AudioCommit() | AudioClear() | ResponseCreate():
            body = {}
        case _:
            raise TypeError(f"not a client event: {event!r}")
    return {"type": event.TYPE, "event_id": event_id, **body}


def encode(event: ClientEvent, event_id: str) -> str:
    """``event`` as one compact JSON text frame."""
    return json.dumps(to_dict(event, event_id), separators=(",", ":"))
