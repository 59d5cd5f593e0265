"""What every part of the local backend's session shares: ids, events, client errors, PCM."""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import secrets
import string
from collections.abc import Callable
from typing import Any

__all__ = [
    "RATE",
    "ClientError",
    "CountingIds",
    "EventMaker",
    "IdFactory",
    "Json",
    "decode_pcm",
    "is_int",
    "is_num",
    "ms",
    "random_id",
    "require",
]

RATE = 24000
"""The one audio format the local backend speaks: PCM16 mono at 24 kHz."""

Json = dict[str, Any]
IdFactory = Callable[[str], str]
"""``new_id(prefix)`` -> a fresh id such as ``item_…`` (``event``, ``item``, ``resp``, …)."""

_ALPHABET = string.ascii_letters + string.digits


def random_id(prefix: str) -> str:
    """An id like the service's: the prefix and 21 random letters and digits."""
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(21))


class CountingIds:
    """Deterministic ids for tests: ``item_1``, ``item_2``, ``event_1``, … (one count a prefix)."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def __call__(self, prefix: str) -> str:
        counter = self._counters.setdefault(prefix, itertools.count(1))
        return f"{prefix}_{next(counter)}"


class EventMaker:
    """Builds server events, each with a fresh ``event_id`` from ``new_id``."""

    def __init__(self, new_id: IdFactory) -> None:
        self.new_id = new_id

    def __call__(self, type_: str, **body: Any) -> Json:
        return {"type": type_, "event_id": self.new_id("event"), **body}


class ClientError(Exception):
    """A client event the session refuses: becomes an ``error`` event; the session goes on."""

    def __init__(
        self, message: str, *, code: str | None = "invalid_value", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def require(cond: bool, message: str, param: str | None, code: str = "invalid_value") -> None:
    """Raise :class:`ClientError` unless ``cond``."""
    if not cond:
        raise ClientError(message, code=code, param=param)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ms(samples: int) -> int:
    """Milliseconds of ``samples`` at :data:`RATE`, rounded down."""
    return samples * 1000 // RATE


def decode_pcm(b64: Any, param: str) -> bytes:
    """The PCM16 bytes of a base64 field, or a :class:`ClientError` naming ``param``."""
    require(isinstance(b64, str), f"Invalid type for '{param}': expected a base64 string.", param)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"Invalid '{param}': not valid base64.", param=param) from None
    require(len(raw) % 2 == 0, f"Invalid '{param}': PCM16 needs an even byte count.", param)
    return raw
