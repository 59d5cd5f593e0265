"""The device id a robot's rows carry on the fleet server: ``R2D2_DEVICE_ID``, else the hostname."""

from __future__ import annotations

import re
import socket

from r2d2voice.errors import ConfigError

__all__ = ["DEVICE_ID_RULE", "check_device_id", "default_device_id", "resolve_device_id"]

#: What a valid device id looks like (for error messages and the settings table).
DEVICE_ID_RULE = "1-64 letters, digits and . _ - : @, starting with a letter or digit"
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


def check_device_id(text: str, *, source: str = "R2D2_DEVICE_ID") -> str:
    """``text`` if it is a valid device id, else :class:`ConfigError` (exit 3)."""
    if not isinstance(text, str) or not _VALID.fullmatch(text):
        raise ConfigError(f"{source}: {text!r} is not a device id ({DEVICE_ID_RULE})")
    return text


def default_device_id() -> str:
    """The hostname (as ``hostname`` prints it), when it is a valid device id."""
    return check_device_id(socket.gethostname(),
                           source="the hostname (set R2D2_DEVICE_ID instead)")


def resolve_device_id(value: str | None) -> str:
    """The device id for ``value`` (``R2D2_DEVICE_ID`` or ``--device-id``; None or empty: the
    hostname)."""
    return check_device_id(value) if value else default_device_id()
