"""GPT-Live events for tests: the openai SDK's schemas (``openai.types.live``) made strict, and
server events built the way the service words them, each checked against those schemas.

The SDK's models accept unknown fields; the service does not (``session.start`` is strict), so
:func:`check_client` also refuses any field the schema does not name.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from openai.types.live import ClientEvent, ServerEvent
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

CLIENT = TypeAdapter(ClientEvent)
SERVER = TypeAdapter(ServerEvent)
BACKEND = TypeAdapter(ResponseStreamEvent)
Json = dict[str, Any]


def unknown_fields(value: Any, path: str = "") -> list[str]:
    """Paths of the fields no schema named, anywhere in a validated SDK model."""
    if isinstance(value, BaseModel):
        found = [f"{path}.{k}".lstrip(".") for k in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += unknown_fields(getattr(value, name), f"{path}.{name}")
        return found
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in unknown_fields(v, f"{path}[{i}]")]
    return []


def check_client(wire: str | Json) -> Any:
    """A client event (JSON text or dict) validated against ``ClientEvent``, strictly."""
    data = json.loads(wire) if isinstance(wire, str) else wire
    parsed = CLIENT.validate_python(data)
    extra = unknown_fields(parsed)
    assert not extra, f"{data['type']}: fields the service would reject: {extra}"
    return parsed


def check_server(event: Json) -> Json:
    """A server event validated against ``ServerEvent`` (and a ``response.event``'s nested
    Responses event against ``ResponseStreamEvent``)."""
    SERVER.validate_python(event)
    if event["type"] == "response.event":
        BACKEND.validate_python(event["event"])
    return event


_N = iter(range(1, 10**9))


def _ev(type_: str, **body: Any) -> str:
    return json.dumps(check_server({"type": type_, "event_id": f"event_{next(_N)}", **body}))


def resource(session_id: str = "sess_live_1", model: str = "gpt-live-1") -> Json:
    return {"id": session_id, "expires_at": 1_900_000_000, "model": model, "status": "active",
            "audio": {"format": {"type": "audio/pcm", "rate": 24000},
                      "output": {"voice": "marin"}}}


def started(session_id: str = "sess_live_1", client_event_id: str | None = None) -> str:
    extra = {"client_event_id": client_event_id} if client_event_id else {}
    return _ev("session.started", session=resource(session_id), **extra)


def said(role: str, delta: str, start_ms: int, end_ms: int) -> str:
    kind = "input" if role == "user" else "output"
    return _ev(f"session.{kind}_transcript.delta", delta=delta, start_ms=start_ms, end_ms=end_ms)


def audio(pcm: bytes) -> str:
    return _ev("session.output_audio.delta", delta=base64.b64encode(pcm).decode())


def usage(seconds: float) -> str:
    return _ev("session.usage.updated", usage={"seconds": seconds})


def closed(reason: str, seconds: float = 12) -> str:
    return _ev("session.closed", reason=reason, session=resource(), usage={"seconds": seconds})


def delegated(delegation_id: str, target: str, offset_ms: int,
              response_id: str | None = None) -> str:
    delegation: Json = {"id": delegation_id, "target": target, "type": "delegation"}
    if response_id:
        delegation["response_id"] = response_id
    return _ev("session.delegation.created", delegation=delegation, offset_ms=offset_ms)


def _response(response_id: str, status: str, usage: Json | None = None) -> Json:
    body: Json = {"id": response_id, "created_at": 1_900_000_000, "model": "gpt-5.5",
                  "object": "response", "output": [], "parallel_tool_calls": True,
                  "tool_choice": "auto", "tools": [], "status": status}
    if usage:
        body["usage"] = usage
    return body


def backend(delegation_id: str | None, inner: Json) -> str:
    return _ev("response.event", delegation_id=delegation_id, event=inner)


def backend_created(delegation_id: str, response_id: str) -> str:
    return backend(delegation_id, {"type": "response.created", "sequence_number": 0,
                                   "response": _response(response_id, "in_progress")})


def backend_call(delegation_id: str, call_id: str, name: str, arguments: str) -> str:
    item = {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}
    return backend(delegation_id, {"type": "response.output_item.done", "sequence_number": 1,
                                   "output_index": 0, "item": item})


def backend_done(delegation_id: str, response_id: str, status: str = "completed",
                 tokens: tuple[int, int] = (120, 30)) -> str:
    usage = {"input_tokens": tokens[0], "output_tokens": tokens[1], "total_tokens": sum(tokens),
             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    kind = {"completed": "response.completed", "failed": "response.failed",
            "incomplete": "response.incomplete"}[status]
    return backend(delegation_id, {"type": kind, "sequence_number": 2,
                                   "response": _response(response_id, status, usage)})


def error(code: str, message: str, *, type_: str = "invalid_request_error",
          param: str | None = None, client_event_id: str | None = None) -> str:
    body: Json = {"type": type_, "code": code, "message": message}
    if param:
        body["param"] = param
    if client_event_id:
        body["client_event_id"] = client_event_id
    return _ev("error", error=body)
