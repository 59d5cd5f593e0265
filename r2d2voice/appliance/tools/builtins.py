"""The opt-in built-in tools: ``get_time``, ``set_volume`` (persisted) and ``end_conversation``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio

log = logging.getLogger("r2d2voice.appliance.tools")

_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}

BUILTINS: dict[str, tuple[str, dict[str, Any]]] = {
    "get_time": (
        "Tell the current local date, time and time zone (you do not know them otherwise).",
        _NO_ARGUMENTS),
    "set_volume": (
        "Set the loudness of your voice, from 0 (silent) to 100 (loudest).",
        {"type": "object", "required": ["percent"], "additionalProperties": False,
         "properties": {"percent": {"type": "integer", "minimum": 0, "maximum": 100,
                                    "description": "volume in percent"}}}),
    "end_conversation": (
        "End the conversation and hang up. Call it when the user says goodbye or asks you to "
        "stop or go to sleep; say a short goodbye after it returns.",
        _NO_ARGUMENTS),
}
END_OUTPUT = "ok: say a short goodbye now; the conversation ends after it"


def zone_name() -> str | None:
    """The IANA name of the local time zone (TZ, else the /etc/localtime link), if known."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz:
        return tz
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        return None
    _, sep, name = target.partition("zoneinfo/")
    return name if sep and name else None


def time_report(now: datetime | None = None) -> str:
    """``get_time``'s output: weekday, date, time, zone name and UTC offset."""
    zone = zone_name() if now is None else getattr(now.tzinfo, "key", None)
    if now is None:
        try:
            now = datetime.now(ZoneInfo(zone)) if zone else datetime.now().astimezone()
        except (ZoneInfoNotFoundError, ValueError):
            now = datetime.now().astimezone()
    offset = now.utcoffset() or timedelta(0)
    sign, minutes = ("+" if offset >= timedelta(0) else "-"), abs(offset) // timedelta(minutes=1)
    utc = f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    abbrev = now.tzname() or utc
    where = f"{zone} ({abbrev}, {utc})" if zone and zone != abbrev else f"{abbrev} ({utc})"
    return f"{now:%A %Y-%m-%d %H:%M:%S}, time zone {where}"


class Volume:
    """The playback volume in percent, persisted in a small JSON file when ``state_path`` is
    given. Listeners get the new gain (0..1) on every change."""

    def __init__(self, state_path: str | os.PathLike[str] | None = None) -> None:
        self.state_path = Path(state_path) if state_path is not None else None
        self.percent = self._load()
        self._listeners: list[Callable[[float], None]] = []

    @property
    def gain(self) -> float:
        """Linear amplitude for playback: the square of the fraction, so 50 % is about -12 dB
        and each step sounds alike."""
        return (self.percent / 100) ** 2

    def subscribe(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(gain)`` after every change (from the trio thread, must not block)."""
        self._listeners.append(listener)

    async def set(self, percent: int) -> None:
        """Apply ``percent`` now; write the state file in a worker thread."""
        self.percent = percent
        for listener in self._listeners:
            listener(self.gain)
        if self.state_path is not None:
            await trio.to_thread.run_sync(self._save)

    def _load(self) -> int:
        if self.state_path is None or not self.state_path.exists():
            return 100
        try:
            value = json.loads(self.state_path.read_text(encoding="utf-8"))["volume_percent"]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
                return value
            raise ValueError(f"volume_percent {value!r} is not 0..100")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring tool state %s (%s): volume 100 %%", self.state_path, exc)
            return 100

    def _save(self) -> None:
        assert self.state_path is not None
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"volume_percent": self.percent}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.warning("could not save the volume to %s: %s", self.state_path, exc)
