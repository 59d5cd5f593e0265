"""The session object: its defaults and the validation of ``session.update`` (pure functions).

A rejected update raises :class:`~r2d2voice.localbackend.wire.ClientError` and changes nothing;
an accepted one returns a new session dict (the old one is never mutated).
"""

from __future__ import annotations

import copy
from typing import Any

from r2d2voice.localbackend.tools import check_tool_choice, check_tools
from r2d2voice.localbackend.wire import RATE, Json, is_int, is_num, require

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_MODEL",
    "LOCAL_MODEL",
    "apply_update",
    "check_output_modalities",
    "default_session",
    "default_turn_detection",
    "vad_params",
]

DEFAULT_MODEL = "gpt-realtime"
#: The model every local session names, whatever was asked for: the backend identifies itself,
#: so a client records (and never bills) it as local, whichever URL reached it.
LOCAL_MODEL = "local"
DEFAULT_INSTRUCTIONS = "You are R2-D2. You answer in beeps and whistles."

_SESSION_KEYS = {
    "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
    "max_output_tokens", "tracing", "truncation", "prompt", "include",
}
_COPIED_AS_IS = ("max_output_tokens", "tracing", "truncation", "prompt", "include")
_TURN_DETECTION_KEYS = {
    "type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
    "interrupt_response", "idle_timeout_ms", "eagerness",
}
_VAD_KEYS = ("threshold", "prefix_padding_ms", "silence_duration_ms")


def default_turn_detection() -> Json:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }


def default_session(session_id: str, expires_at: int) -> Json:
    """The session a new connection starts with (as ``session.created`` shows it); its
    ``model`` is always :data:`LOCAL_MODEL` (a ``session.update`` does not change it)."""
    pcm = {"type": "audio/pcm", "rate": RATE}
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": LOCAL_MODEL,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "expires_at": expires_at,
        "audio": {
            "input": {
                "format": dict(pcm),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": default_turn_detection(),
            },
            "output": {"format": dict(pcm), "voice": "marin", "speed": 1.0},
        },
    }


def vad_params(turn_detection: Json | None) -> dict[str, Any] | None:
    """:class:`~r2d2voice.audio.vad.EnergyVad` keyword arguments, or None (no turn detection).

    ``semantic_vad`` has none of these keys: it runs as the energy VAD with the server_vad
    defaults.
    """
    if turn_detection is None:
        return None
    defaults = default_turn_detection()
    return {k: turn_detection[k] if turn_detection.get(k) is not None else defaults[k]
            for k in _VAD_KEYS}


def apply_update(session: Json, update: Any) -> tuple[Json, bool]:
    """``session`` with the ``session.update`` body ``update`` applied, and whether turn
    detection changed. Raises :class:`ClientError` for anything the backend refuses."""
    require(isinstance(update, dict), "Missing required parameter: 'session'.", "session",
            "missing_required_parameter")
    require("type" in update, "Missing required parameter: 'session.type'.", "session.type",
            "missing_required_parameter")
    require(update["type"] == "realtime",
            "The local backend supports only session.type 'realtime'.", "session.type")
    _check_keys(update, _SESSION_KEYS, "session")
    new = copy.deepcopy(session)
    for key in _COPIED_AS_IS:
        if key in update:
            new[key] = copy.deepcopy(update[key])
    if "instructions" in update:
        require(isinstance(update["instructions"], str),
                "Invalid type for 'session.instructions': expected a string.",
                "session.instructions")
        new["instructions"] = update["instructions"]
    if "output_modalities" in update:
        check_output_modalities(update["output_modalities"], "session.output_modalities")
    if "tools" in update:
        new["tools"] = check_tools(update["tools"] if update["tools"] is not None else [])
    if "tool_choice" in update or isinstance(new["tool_choice"], dict):
        new["tool_choice"] = check_tool_choice(update.get("tool_choice", new["tool_choice"]),
                                               new["tools"])
    vad_changed = False
    audio = update.get("audio")
    if audio is not None:
        require(isinstance(audio, dict),
                "Invalid type for 'session.audio': expected an object.", "session.audio")
        _check_keys(audio, {"input", "output"}, "session.audio")
        if audio.get("input") is not None:
            vad_changed = _update_input(new["audio"]["input"], audio["input"])
        if audio.get("output") is not None:
            _update_output(new["audio"]["output"], audio["output"])
    return new, vad_changed


def check_output_modalities(value: Any, param: str) -> None:
    require(value == ["audio"],
            "The local backend replies with audio only: output_modalities ['audio'].", param)


def _check_keys(d: Json, allowed: set[str], where: str) -> None:
    for key in d:
        require(key in allowed, f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}",
                "unknown_parameter")


def _check_format(fmt: Any, where: str) -> None:
    require(isinstance(fmt, dict), f"Invalid type for '{where}': expected an object.", where)
    require(fmt.get("type", "audio/pcm") == "audio/pcm" and fmt.get("rate", RATE) == RATE,
            "The local backend supports only audio/pcm at 24000 Hz.", where)


def _object_or_null(value: Any, param: str) -> Any:
    require(value is None or isinstance(value, dict),
            f"Invalid type for '{param}': expected an object or null.", param)
    return copy.deepcopy(value)


def _update_input(target: Json, inp: Any) -> bool:
    where = "session.audio.input"
    require(isinstance(inp, dict), f"Invalid type for '{where}': expected an object.", where)
    _check_keys(inp, {"format", "transcription", "noise_reduction", "turn_detection"}, where)
    if "format" in inp:
        _check_format(inp["format"], f"{where}.format")
        target["format"] = {"type": "audio/pcm", "rate": RATE}
    for key in ("transcription", "noise_reduction"):
        if key in inp:
            target[key] = _object_or_null(inp[key], f"{where}.{key}")
    if "turn_detection" not in inp:
        return False
    target["turn_detection"] = _turn_detection(target["turn_detection"], inp["turn_detection"])
    return True


def _turn_detection(old: Json | None, td: Any) -> Json | None:
    p = "session.audio.input.turn_detection"
    if td is None:
        return None
    require(isinstance(td, dict), f"Invalid type for '{p}': expected an object or null.", p)
    _check_keys(td, _TURN_DETECTION_KEYS, p)
    require(td.get("type") in ("server_vad", "semantic_vad"),
            f"Invalid value for '{p}.type': expected 'server_vad' or 'semantic_vad'.", f"{p}.type")
    if "threshold" in td:
        v = td["threshold"]
        require(v is None or (is_num(v) and 0.0 <= v <= 1.0),
                f"Invalid '{p}.threshold': expected a number between 0.0 and 1.0.",
                f"{p}.threshold")
    for key in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
        if key in td:
            v = td[key]
            require(v is None or (is_int(v) and v >= 0),
                    f"Invalid '{p}.{key}': expected a non-negative integer.", f"{p}.{key}")
    for key in ("create_response", "interrupt_response"):
        if key in td:
            require(td[key] is None or isinstance(td[key], bool),
                    f"Invalid '{p}.{key}': expected a boolean.", f"{p}.{key}")
    merged = default_turn_detection()
    if old is not None and old.get("type") == td["type"]:
        merged.update(old)
    merged.update({k: v for k, v in td.items() if v is not None})
    if td["type"] == "semantic_vad":
        for key in _VAD_KEYS:
            merged.pop(key, None)
        merged.setdefault("eagerness", "auto")
    return merged


def _update_output(target: Json, out: Any) -> None:
    where = "session.audio.output"
    require(isinstance(out, dict), f"Invalid type for '{where}': expected an object.", where)
    _check_keys(out, {"format", "voice", "speed"}, where)
    if "format" in out:
        _check_format(out["format"], f"{where}.format")
    if "voice" in out:
        v = out["voice"]
        require(isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("id"), str)),
                f"Invalid type for '{where}.voice'.", f"{where}.voice")
        target["voice"] = copy.deepcopy(v)
    if "speed" in out:
        v = out["speed"]
        require(is_num(v) and 0.25 <= v <= 1.5,
                f"Invalid '{where}.speed': expected a number between 0.25 and 1.5.",
                f"{where}.speed")
        target["speed"] = v
