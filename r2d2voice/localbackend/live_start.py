"""``session.start`` as GPT-Live checks it — strictly: an unknown field is refused, named — and
the resolved session ``session.started`` shows (pure functions)."""

from __future__ import annotations

import copy
from typing import Any

from r2d2voice.localbackend.session_config import LOCAL_MODEL
from r2d2voice.localbackend.tools import check_tools
from r2d2voice.localbackend.wire import RATE, ClientError, Json, is_int, require

__all__ = ["LIVE_MODEL", "LIVE_VOICE", "start_session"]

LIVE_MODEL = "gpt-live-1"
LIVE_VOICE = "marin"
MAX_INPUT_ITEMS = 128

_EVENT_KEYS = {"type", "event_id", "session"}
_SESSION_KEYS = {"model", "instructions", "audio", "delegation", "input", "safety_identifier",
                 "store", "triggers", "client"}
_RESPONSES_KEYS = {"model", "instructions", "tools", "tool_choice", "parallel_tool_calls",
                   "max_output_tokens", "reasoning", "text", "service_tier"}
_ITEM_KEYS = {"type", "role", "content", "id", "status"}
_PART_TYPES = {"user": ("input_text",), "developer": ("input_text",),
               "assistant": ("output_text", "text")}


def _keys(d: Any, allowed: set[str], where: str) -> Json:
    require(isinstance(d, dict), f"Invalid type for '{where}': expected an object.", where)
    for key in d:
        path = f"{where}.{key}" if where else key
        require(key in allowed, f"Unknown parameter: '{path}'.", path, "unknown_parameter")
    return d


def _has(session: Json, path: str) -> bool:
    """Whether the dotted ``path`` (``session.x.y``) is set in ``session``."""
    node: Any = {"session": session}
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _audio(audio: Any) -> Json:
    _keys(audio, {"format", "output"}, "session.audio")
    fmt = audio.get("format", {"type": "audio/pcm", "rate": RATE})
    _keys(fmt, {"type", "rate"}, "session.audio.format")
    require(fmt.get("type") == "audio/pcm" and fmt.get("rate") == RATE,
            "The local backend speaks only audio/pcm at 24000 Hz.", "session.audio.format")
    output = _keys(audio.get("output", {}), {"voice"}, "session.audio.output")
    voice = output.get("voice", LIVE_VOICE)
    require(isinstance(voice, str), "Invalid type for 'session.audio.output.voice': expected "
            "a string.", "session.audio.output.voice")
    return {"format": {"type": "audio/pcm", "rate": RATE}, "output": {"voice": voice}}


def _delegation(value: Any) -> Json | None:
    where = "session.delegation"
    if value is None:
        return None
    _keys(value, {"type", "responses", "acknowledgement_delay_ms"}, where)
    kind = value.get("type")
    require(kind in ("client", "responses"), f"Invalid value for '{where}.type': the local "
            "backend supports 'client' and 'responses'.", f"{where}.type")
    delay = value.get("acknowledgement_delay_ms", 0)
    require(is_int(delay) and delay >= 0, f"Invalid '{where}.acknowledgement_delay_ms'.",
            f"{where}.acknowledgement_delay_ms")
    if kind == "client":
        require("responses" not in value, f"Unknown parameter: '{where}.responses'.",
                f"{where}.responses", "unknown_parameter")
        return copy.deepcopy(value)
    responses = _keys(value.get("responses"), _RESPONSES_KEYS, f"{where}.responses")
    require(isinstance(responses.get("model"), str), f"Missing required parameter: "
            f"'{where}.responses.model'.", f"{where}.responses.model",
            "missing_required_parameter")
    out = copy.deepcopy(value)
    if "tools" in responses:
        out["responses"]["tools"] = check_tools(responses["tools"], f"{where}.responses.tools")
    return out


def _input(items: Any) -> list[Json]:
    where = "session.input"
    require(isinstance(items, list) and len(items) <= MAX_INPUT_ITEMS,
            f"Invalid '{where}': expected an array of at most {MAX_INPUT_ITEMS} messages.", where)
    for i, item in enumerate(items):
        p = f"{where}[{i}]"
        _keys(item, _ITEM_KEYS, p)
        role = item.get("role")
        require(role in _PART_TYPES, f"Invalid value for '{p}.role'.", f"{p}.role")
        parts = item.get("content")
        require(isinstance(parts, list) and len(parts) == 1,
                f"Invalid '{p}.content': supply exactly one text part.", f"{p}.content")
        part = _keys(parts[0], {"type", "text"}, f"{p}.content[0]")
        require(isinstance(part.get("text"), str)
                and part.get("type", _PART_TYPES[role][0]) in _PART_TYPES[role],
                f"Invalid '{p}.content[0]': expected a text part.", f"{p}.content[0]")
    return copy.deepcopy(items)


def start_session(event: Json, *, session_id: str, expires_at: int,
                  rejected: str | None = None) -> Json:
    """The resolved session of a ``session.start``, or a :class:`ClientError` naming the
    field the service would refuse (``rejected``: a field path refused as if unknown)."""
    _keys(event, _EVENT_KEYS, "")
    session = _keys(event.get("session"), _SESSION_KEYS, "session")
    if rejected and _has(session, rejected):
        raise ClientError(f"Unknown parameter: '{rejected}'.", code="unknown_parameter",
                          param=rejected)
    model = session.get("model")
    require(isinstance(model, str) and bool(model), "Missing required parameter: "
            "'session.model'.", "session.model", "missing_required_parameter")
    instructions = session.get("instructions")
    require(instructions is None or isinstance(instructions, str),
            "Invalid type for 'session.instructions': expected a string.",
            "session.instructions")
    # the model asked for is checked, and the session names LOCAL_MODEL whatever it was (as
    # the Realtime side does): a client records it and never bills it
    resolved: Json = {"id": session_id, "expires_at": expires_at, "model": LOCAL_MODEL,
                      "status": "active", "audio": _audio(session.get("audio", {}))}
    if instructions is not None:
        resolved["instructions"] = instructions
    delegation = _delegation(session.get("delegation"))
    if delegation is not None:
        resolved["delegation"] = delegation
    if "input" in session:
        resolved["input"] = _input(session["input"])
    return resolved
