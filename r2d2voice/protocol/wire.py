"""Reading a service's JSON events, for every protocol core: the errors, the record of an event
nobody uses, typed field readers and the dispatch of one message to its parser."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ProtocolError(ValueError):
    """A message that is not a usable server event (non-JSON, binary, missing fields)."""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed event the appliance has no use for (or an unknown type)."""

    type: str


def string(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"{d.get('type')!r} event without string field {key!r}")
    return v


def mapping(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def parse_with(parsers: Mapping[str, Callable[[dict[str, Any], str], Any]],
               message: str | bytes) -> Any:
    """One websocket message as the record its type's parser makes (:class:`Ignored` for a
    type without one). Raises ProtocolError for binary frames, non-JSON text and known event
    types missing the fields the appliance needs."""
    if isinstance(message, bytes):
        raise ProtocolError(f"binary frame of {len(message)} bytes")
    try:
        d = json.loads(message)
    except ValueError:
        raise ProtocolError(f"non-JSON text frame: {message[:60]!r}") from None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise ProtocolError("JSON frame without an event type")
    parser = parsers.get(d["type"])
    return parser(d, message) if parser else Ignored(d["type"])
