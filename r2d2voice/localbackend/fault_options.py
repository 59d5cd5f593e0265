"""``--fault NAME[=VALUE]``: the switches of :class:`~.faults.Faults` from command-line words.

``NAME`` is a :class:`Faults` field (``-`` or ``_``). A boolean switch needs no value;
``fail_responses`` is ``N`` (a rate-limit failure) or ``N:KIND`` and may be repeated;
``audio_delta_ms`` is ``A`` or ``A-B``; ``live_close`` is ``REASON`` or ``REASON:N`` (after
the first reply, or the Nth); ``transcript_delay`` is ``after_reply_start``,
``after_response_done`` or seconds. Any error is a :class:`FaultError`, one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from r2d2voice.localbackend.faults import (
    CONNECT_CLOSE_CODES,
    LIVE_CLOSES,
    LIVE_ERRORS,
    RESPONSE_FAULTS,
    Faults,
)

__all__ = ["FaultError", "parse_faults"]


class FaultError(ValueError):
    """A ``--fault`` that cannot be used; ``str()`` is one line."""


def _int(value: str) -> int:
    return int(value)


def _float(value: str) -> float:
    return float(value)


def _bool(value: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    if value.lower() not in words:
        raise ValueError("true or false")
    return words[value.lower()]


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return parse


def _delay(value: str) -> str | float:
    if value in ("after_reply_start", "after_response_done"):
        return value
    return float(value)


def _range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition("-")
    return int(lo), int(hi or lo)


def _live_close(value: str) -> tuple[str, int]:
    how, _, n = value.partition(":")
    return _choice(*LIVE_CLOSES)(how), int(n or "1")


def _fail(value: str) -> tuple[int, str]:
    n, _, kind = value.partition(":")
    return int(n), _choice(*RESPONSE_FAULTS)(kind or "failed")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "abort_after_responses": _int,
    "close_after_responses": _int,
    "close_code": _int,
    "expire_after_responses": _int,
    "reply_delay_s": _float,
    "reply_seconds": _float,
    "junk": _bool,
    "connect_error": _choice(*CONNECT_CLOSE_CODES),
    "session_minutes": _float,
    "transcript_delay": _delay,
    "transcript_outcome": _choice("completed", "empty", "failed", "never"),
    "fail_responses": _fail,
    "leftover_audio_deltas": _int,
    "benign_errors": _bool,
    "audio_delta_ms": _range,
    "server_ping_s": _float,
    "rate_limits": _bool,
    "extra_fields": _bool,
    "live_close": _live_close,
    "live_error": _choice(*LIVE_ERRORS),
    "live_reject": str,
}
_EXPECTED = {key: "a number" for key, parse in _PARSERS.items() if parse in (_int, _float)}
_EXPECTED.update(audio_delta_ms="milliseconds: A or A-B", transcript_delay=(
    "after_reply_start, after_response_done or seconds"), fail_responses=(
    "N or N:KIND, KIND one of " + ", ".join(RESPONSE_FAULTS)), live_close=(
    "REASON or REASON:N, REASON one of " + ", ".join(LIVE_CLOSES)))
assert set(_PARSERS) == {f.name for f in dataclasses.fields(Faults)}


def parse_faults(specs: Iterable[str], base: Faults | None = None) -> Faults:
    """``base`` (default: all off) with every ``NAME[=VALUE]`` of ``specs`` applied."""
    faults = base or Faults()
    for spec in specs:
        name, eq, value = spec.partition("=")
        key = name.strip().replace("-", "_")
        parse = _PARSERS.get(key)
        if parse is None:
            raise FaultError(f"--fault {spec}: unknown fault {name!r} (known: "
                             + ", ".join(_PARSERS) + ")")
        if not eq:
            if parse is not _bool:
                raise FaultError(f"--fault {spec}: {key} needs a value ({key}=VALUE)")
            value = "true"
        try:
            parsed = parse(value.strip())
        except ValueError as exc:
            why = f"{key}: expected {_EXPECTED.get(key, exc)}"
            raise FaultError(f"--fault {spec}: {why}") from None
        if key == "fail_responses":
            parsed = (*faults.fail_responses, parsed)
        try:
            faults = dataclasses.replace(faults, **{key: parsed})
        except ValueError as exc:
            raise FaultError(f"--fault {spec}: {exc}") from None
    return faults
