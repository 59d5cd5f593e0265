"""Server events of the GA Realtime protocol: frozen records and :func:`parse_event`.

Only the fields the appliance uses are read; unknown fields (``phase``, ``reasoning_tokens``,
``obfuscation``, …) are ignored and unknown event types come back as :class:`Ignored`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.protocol.wire import Ignored, ProtocolError, parse_with
from r2d2voice.protocol.wire import mapping as _dict
from r2d2voice.protocol.wire import opt_str as _opt_str
from r2d2voice.protocol.wire import string as _s

#: Service error codes that no retry can fix: the run ends with exit 3.
FATAL_ERROR_CODES = frozenset({
    "invalid_api_key", "insufficient_quota", "billing_hard_limit_reached", "model_not_found",
    "invalid_model", "account_deactivated",
})
#: Error codes after which the service closes the session; a new session can go on.
SESSION_END_CODES = frozenset({"session_expired"})
#: Errors the service sends in ordinary races (a cancel after the reply ended, a commit after its
#: VAD took the buffer, a response.create while one is active): logged, never stored or counted.
BENIGN_ERROR_CODES = frozenset({
    "response_cancel_not_active", "conversation_already_has_active_response",
    "input_audio_buffer_commit_empty",
})
#: A truncate racing the end of the audio it names (leftover deltas the item does not hold).
BENIGN_MESSAGE = "already shorter than"


@dataclass(frozen=True, slots=True)
class SessionCreated:
    session_id: str
    model: str | None


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    session_id: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class InputCommitted:
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True, slots=True)
class UserTranscript:
    item_id: str
    transcript: str
    raw: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True, slots=True)
class UserTranscriptFailed:
    item_id: str
    message: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True, slots=True)
class TimeoutTriggered:
    """The idle timeout passed: ``item_id`` is the empty user item the nudge commits."""

    item_id: str


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    response_id: str
    item_id: str
    role: str | None
    #: ``message``, ``function_call``, …
    kind: str = "message"
    name: str | None = None  # a function call's tool name
    call_id: str | None = None  # a function call's id


@dataclass(frozen=True, slots=True)
class CallArgumentsDelta:
    """``response.function_call_arguments.delta``: more of a call's arguments."""

    response_id: str
    item_id: str
    call_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class CallArgumentsDone:
    """``response.function_call_arguments.done``: the call's final arguments (JSON text, maybe
    with whitespace and newlines; also sent for an interrupted response)."""

    response_id: str
    item_id: str
    call_id: str
    name: str | None
    arguments: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AudioDelta:
    response_id: str
    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class TranscriptDone:
    response_id: str
    item_id: str
    transcript: str
    raw: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str
    usage: dict[str, Any] | None
    status_details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ItemTruncated:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class ServiceError:
    type: str
    code: str | None
    message: str
    event_id: str | None = None

    @property
    def fatal(self) -> bool:
        """True when retrying cannot help (bad key, no quota, unknown model)."""
        return self.code in FATAL_ERROR_CODES or self.type == "authentication_error"

    @property
    def ends_session(self) -> bool:
        return self.code in SESSION_END_CODES

    @property
    def benign(self) -> bool:
        """An ordinary race, not a fault: log it and go on (see :data:`BENIGN_ERROR_CODES`)."""
        return self.code in BENIGN_ERROR_CODES or BENIGN_MESSAGE in self.message


@dataclass(frozen=True, slots=True)
class McpApprovalRequest:
    """An ``mcp_approval_request`` item: the service asks before it calls a remote MCP
    server's tool (``response_id``: None when it came as a ``conversation.item.done``)."""

    response_id: str | None
    item_id: str
    server_label: str
    name: str
    arguments: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class McpCall:
    """A finished ``mcp_call`` item: the service called a remote MCP server's tool; its
    ``output``, or ``error`` (the error's message), and the approval it followed, if any."""

    response_id: str | None
    item_id: str
    server_label: str
    name: str
    arguments: str = field(repr=False)
    output: str | None = field(default=None, repr=False)
    error: str | None = None
    approval_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class McpListTools:
    """A finished ``mcp_list_tools`` item: the tools the service found on a remote server."""

    item_id: str
    server_label: str
    tools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class McpListToolsFailed:
    """``mcp_list_tools.failed``: the service could not list a remote server's tools."""

    item_id: str


McpEvent = McpApprovalRequest | McpCall | McpListTools | McpListToolsFailed


ServerEvent = (
    SessionCreated | SessionUpdated | SpeechStarted | SpeechStopped | InputCommitted
    | TimeoutTriggered | UserTranscript | UserTranscriptFailed | ResponseCreated
    | OutputItemAdded | AudioDelta | TranscriptDelta | TranscriptDone | CallArgumentsDelta
    | CallArgumentsDone | ResponseDone | ItemTruncated | ServiceError | McpApprovalRequest
    | McpCall | McpListTools | McpListToolsFailed | Ignored
)


def _i(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{d.get('type')!r} event without integer field {key!r}")
    return v


def _audio_delta(d: dict[str, Any], raw: str) -> AudioDelta:
    try:
        pcm = base64.b64decode(_s(d, "delta"), validate=True)
    except binascii.Error:
        raise ProtocolError("audio delta that is not base64") from None
    return AudioDelta(_s(d, "response_id"), _s(d, "item_id"), pcm)


def _output_item(d: dict[str, Any], raw: str) -> OutputItemAdded:
    item = _dict(d.get("item"))
    kind = _opt_str(item.get("type")) or "message"
    if kind == "function_call":
        return OutputItemAdded(_s(d, "response_id"), _s(item, "id"), None, kind,
                               _s(item, "name"), _s(item, "call_id"))
    return OutputItemAdded(_s(d, "response_id"), _s(item, "id"), _opt_str(item.get("role")),
                           kind)


def _item_done(d: dict[str, Any], raw: str) -> ServerEvent:
    """``response.output_item.done`` / ``conversation.item.done``: the MCP items the service
    made (the same item may come in both); any other item means nothing here."""
    item = _dict(d.get("item"))
    kind = item.get("type")
    response_id = _opt_str(d.get("response_id"))
    if kind == "mcp_approval_request":
        return McpApprovalRequest(response_id, _s(item, "id"), _s(item, "server_label"),
                                  _s(item, "name"), _s(item, "arguments"))
    if kind == "mcp_call":
        error = item.get("error")
        message = None
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or "failed")
        return McpCall(response_id, _s(item, "id"), _s(item, "server_label"), _s(item, "name"),
                       _s(item, "arguments"), _opt_str(item.get("output")), message,
                       _opt_str(item.get("approval_request_id")))
    if kind == "mcp_list_tools":
        names = tuple(str(t.get("name")) for t in item.get("tools") or []
                      if isinstance(t, dict))
        return McpListTools(_opt_str(item.get("id")) or "", _s(item, "server_label"), names)
    return Ignored(str(d.get("type")))


def _response_done(d: dict[str, Any], raw: str) -> ResponseDone:
    r = _dict(d.get("response"))
    usage, details = r.get("usage"), r.get("status_details")
    return ResponseDone(_s(r, "id"), str(r.get("status") or "completed"),
                        usage if isinstance(usage, dict) else None,
                        details if isinstance(details, dict) else None)


def _session_created(d: dict[str, Any], raw: str) -> SessionCreated:
    s = _dict(d.get("session"))
    return SessionCreated(_opt_str(s.get("id")) or "", _opt_str(s.get("model")))


def _error(d: dict[str, Any], raw: str) -> ServiceError:
    e = _dict(d.get("error"))
    return ServiceError(str(e.get("type") or "error"), _opt_str(e.get("code")),
                        str(e.get("message") or ""), _opt_str(e.get("event_id")))


_PARSERS: dict[str, Callable[[dict[str, Any], str], ServerEvent]] = {
    "session.created": _session_created,
    "session.updated": lambda d, raw: SessionUpdated(
        _opt_str(_dict(d.get("session")).get("id")) or ""),
    "input_audio_buffer.speech_started": lambda d, raw: SpeechStarted(
        _s(d, "item_id"), _i(d, "audio_start_ms")),
    "input_audio_buffer.speech_stopped": lambda d, raw: SpeechStopped(
        _s(d, "item_id"), _i(d, "audio_end_ms")),
    "input_audio_buffer.committed": lambda d, raw: InputCommitted(
        _s(d, "item_id"), _opt_str(d.get("previous_item_id"))),
    "conversation.item.input_audio_transcription.completed": lambda d, raw: UserTranscript(
        _s(d, "item_id"), _s(d, "transcript"), raw=raw),
    "conversation.item.input_audio_transcription.failed": lambda d, raw: UserTranscriptFailed(
        _s(d, "item_id"), str(_dict(d.get("error")).get("message") or "failed")),
    "response.created": lambda d, raw: ResponseCreated(_s(_dict(d.get("response")), "id")),
    "response.output_item.added": _output_item,
    "response.output_audio.delta": _audio_delta,
    "response.output_audio_transcript.delta": lambda d, raw: TranscriptDelta(
        _s(d, "response_id"), _s(d, "item_id"), _s(d, "delta")),
    "response.output_audio_transcript.done": lambda d, raw: TranscriptDone(
        _s(d, "response_id"), _s(d, "item_id"), _s(d, "transcript"), raw=raw),
    "response.function_call_arguments.delta": lambda d, raw: CallArgumentsDelta(
        _s(d, "response_id"), _s(d, "item_id"), _s(d, "call_id"), _s(d, "delta")),
    "response.function_call_arguments.done": lambda d, raw: CallArgumentsDone(
        _s(d, "response_id"), _s(d, "item_id"), _s(d, "call_id"), _opt_str(d.get("name")),
        _s(d, "arguments")),
    "input_audio_buffer.timeout_triggered": lambda d, raw: TimeoutTriggered(_s(d, "item_id")),
    "response.done": _response_done,
    "conversation.item.truncated": lambda d, raw: ItemTruncated(
        _s(d, "item_id"), _i(d, "audio_end_ms")),
    "error": _error,
    "response.output_item.done": _item_done,
    "conversation.item.done": _item_done,
    "mcp_list_tools.failed": lambda d, raw: McpListToolsFailed(_s(d, "item_id")),
}


def parse_event(message: str | bytes) -> ServerEvent:
    """Turn one websocket message into an event record (see :func:`parse_with`)."""
    return parse_with(_PARSERS, message)  # type: ignore[no-any-return]
