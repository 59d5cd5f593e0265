"""Server events of the GPT-Live protocol: frozen records and :func:`parse_event`.

Only the fields the appliance uses are read; unknown fields are ignored and unknown event
types come back as :class:`Ignored`. A ``response.event`` (the delegated Responses model's
stream) is unwrapped into the few nested events that matter (:class:`BackendResponse`,
:class:`BackendCall`); the rest of that stream is :class:`Ignored` too.
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

USER, ASSISTANT = "user", "assistant"
#: Error codes no retry can fix: the run ends with exit 3.
FATAL_ERROR_CODES = frozenset({
    "credit_balance_exhausted", "model_not_found", "invalid_model", "invalid_api_key",
    "insufficient_quota", "billing_hard_limit_reached", "account_deactivated",
})
#: ``session.closed`` reasons (``openai.types.live.SessionClosedEvent.reason``)
CLOSE_REASONS = ("close_requested", "expired", "content", "remote_hangup", "connection_lost")
#: nested Responses events that end a delegated response, and the status each means
_BACKEND_FINAL = {"response.completed": "completed", "response.failed": "failed",
                  "response.incomplete": "incomplete"}


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    model: str | None
    client_event_id: str | None = None


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    """``session.input_transcript.delta`` (``role`` user) or ``.output_transcript.delta``
    (assistant): a fragment of what was said between ``start_ms`` and ``end_ms`` on the
    session timeline. There is no "done": utterances are built from these."""

    role: str
    delta: str
    start_ms: int
    end_ms: int
    raw: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True, slots=True)
class AudioDelta:
    """``session.output_audio.delta``: reply audio, in delivery order (no timestamps on a
    primary websocket)."""

    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DelegationCreated:
    """The model handed work to ``target`` (``client``, ``responses``, ``decisions``) at
    ``offset_ms`` of the timeline; no task text."""

    delegation_id: str
    target: str
    offset_ms: int
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """``session.thinking.appended`` / ``.commentary.appended`` / ``.instructions.appended``."""

    kind: str
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class UsageUpdated:
    """The session's billed seconds so far (a total: never summed)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class SessionClosed:
    reason: str
    seconds: float | None


@dataclass(frozen=True, slots=True)
class BackendResponse:
    """A delegated Responses response started (``status`` in_progress) or ended."""

    delegation_id: str | None
    response_id: str
    status: str
    usage: dict[str, Any] | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BackendCall:
    """The delegated model calls function ``name`` (from ``response.output_item.done``); it
    may run once its response completes."""

    delegation_id: str | None
    call_id: str
    item_id: str
    name: str
    arguments: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServiceError:
    type: str
    code: str | None
    message: str
    param: str | None = None
    client_event_id: str | None = None

    @property
    def fatal(self) -> bool:
        """No retry can help (no credit, an unknown model, a refused key)."""
        return self.code in FATAL_ERROR_CODES or self.type == "authentication_error"


@dataclass(frozen=True, slots=True)
class Info:
    code: str
    message: str


ServerEvent = (
    SessionStarted | TranscriptDelta | AudioDelta | DelegationCreated | Appended | UsageUpdated
    | SessionClosed | BackendResponse | BackendCall | ServiceError | Info | Ignored
)


def _i(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{d.get('type')!r} event without integer field {key!r}")
    return v


def _seconds(usage: Any) -> float | None:
    v = _dict(usage).get("seconds")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _transcript(role: str) -> Callable[[dict[str, Any], str], TranscriptDelta]:
    def parse(d: dict[str, Any], raw: str) -> TranscriptDelta:
        start, end = _i(d, "start_ms"), _i(d, "end_ms")
        return TranscriptDelta(role, _s(d, "delta"), start, max(start, end), raw)

    return parse


def _audio(d: dict[str, Any], raw: str) -> AudioDelta:
    try:
        return AudioDelta(base64.b64decode(_s(d, "delta"), validate=True))
    except binascii.Error:
        raise ProtocolError("audio delta that is not base64") from None


def _delegation(d: dict[str, Any], raw: str) -> DelegationCreated:
    dg = _dict(d.get("delegation"))
    return DelegationCreated(_s(dg, "id"), _s(dg, "target"), _i(d, "offset_ms"),
                             _opt_str(dg.get("response_id")))


def _usage(d: dict[str, Any], raw: str) -> UsageUpdated:
    seconds = _seconds(d.get("usage"))
    if seconds is None:
        raise ProtocolError("session.usage.updated without usage.seconds")
    return UsageUpdated(seconds)


def _error(d: dict[str, Any], raw: str) -> ServiceError:
    e = _dict(d.get("error"))
    return ServiceError(str(e.get("type") or "error"), _opt_str(e.get("code")),
                        str(e.get("message") or ""), _opt_str(e.get("param")),
                        _opt_str(e.get("client_event_id")) or _opt_str(d.get("client_event_id")))


def _backend(d: dict[str, Any], raw: str) -> ServerEvent:
    """A ``response.event``: the nested Responses event, if it is one that matters."""
    inner, did = _dict(d.get("event")), _opt_str(d.get("delegation_id"))
    kind = inner.get("type")
    response = _dict(inner.get("response"))
    if kind == "response.created":
        return BackendResponse(did, _s(response, "id"), "in_progress")
    if kind in _BACKEND_FINAL:
        usage, details = response.get("usage"), {
            k: response[k] for k in ("error", "incomplete_details") if response.get(k)}
        status = _opt_str(response.get("status")) or _BACKEND_FINAL[kind]
        return BackendResponse(did, _s(response, "id"), status,
                               usage if isinstance(usage, dict) else None, details or None)
    item = _dict(inner.get("item"))
    if kind == "response.output_item.done" and item.get("type") == "function_call":
        call_id = _s(item, "call_id")
        return BackendCall(did, call_id, _opt_str(item.get("id")) or call_id, _s(item, "name"),
                           _s(item, "arguments"))
    return Ignored(f"response.event/{kind}")


_PARSERS: dict[str, Callable[[dict[str, Any], str], ServerEvent]] = {
    "session.started": lambda d, raw: SessionStarted(
        _s(_dict(d.get("session")), "id"), _opt_str(_dict(d.get("session")).get("model")),
        _opt_str(d.get("client_event_id"))),
    "session.input_transcript.delta": _transcript(USER),
    "session.output_transcript.delta": _transcript(ASSISTANT),
    "session.output_audio.delta": _audio,
    "session.delegation.created": _delegation,
    "session.thinking.appended": lambda d, raw: Appended("thinking", _opt_str(
        d.get("client_event_id"))),
    "session.commentary.appended": lambda d, raw: Appended("commentary", _opt_str(
        d.get("client_event_id"))),
    "session.usage.updated": _usage,
    "session.closed": lambda d, raw: SessionClosed(_s(d, "reason"), _seconds(d.get("usage"))),
    "response.event": _backend,
    "error": _error,
    "info": lambda d, raw: Info(str(d.get("code") or ""), str(d.get("message") or "")),
}


def parse_event(message: str | bytes) -> ServerEvent:
    """Turn one websocket message into an event record (see :func:`parse_with`)."""
    return parse_with(_PARSERS, message)  # type: ignore[no-any-return]
