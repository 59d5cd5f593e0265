"""What a fleet server's failures become: one-line :mod:`r2d2voice.errors` exceptions.

- :class:`FleetUnavailable` (exit 1): down, unreachable, authentication refused, connection
  lost mid-batch, a deadlock or timeout. Nothing was written; retry later, from the same rows.
- :class:`FleetRejected` (exit 1): the server refused the data or a schema change (a bad
  row, no privilege). Retrying the same batch fails the same way.
- :class:`FleetSchemaTooNew` (exit 3): the server's schema is newer than this code.

Messages name the server by :attr:`FleetTarget.display` and never carry the password.
"""

from __future__ import annotations

import re

import psycopg

from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.storage.shipping.url import FleetTarget

__all__ = ["FleetRejected", "FleetSchemaTooNew", "FleetUnavailable", "fleet_error"]


class FleetUnavailable(RuntimeFailure):
    """The fleet server cannot be used right now; nothing was written."""


class FleetRejected(RuntimeFailure):
    """The fleet server refused the data or the schema change; nothing was written."""


class FleetSchemaTooNew(ConfigError):
    """The fleet server's schema is newer than this r2d2voice understands."""


# libpq's preamble repeats what the message already names (the server).
_PREAMBLE = re.compile(r"^(connection failed: )?(connection to server (at|on) .*? failed: )?")


def _one_line(target: FleetTarget, text: str) -> str:
    return target.redact(_PREAMBLE.sub("", " ".join(text.split()), count=1))


def fleet_error(exc: psycopg.Error, target: FleetTarget, doing: str) -> RuntimeFailure:
    """The one-line exception for ``exc``, raised while ``doing`` (e.g. "shipping messages")."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        reason = _one_line(target, str(exc)) or type(exc).__name__
        return FleetUnavailable(f"fleet server {target} unavailable while {doing}: {reason}")
    primary = getattr(exc.diag, "message_primary", None) or str(exc)
    reason = _one_line(target, primary) or type(exc).__name__
    return FleetRejected(f"fleet server {target} refused {doing}: {reason}")
