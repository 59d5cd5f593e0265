"""Fleet server connection strings: parsing, and a form fit to show (no password, ever).

libpq does the real work: a ``postgresql://`` URL (or a ``key=value`` string) may carry the
password itself, or leave it to ``PGPASSWORD``, ``PGPASSFILE`` (``~/.pgpass``) or a
``PGSERVICE`` entry, exactly as for ``psql``. Whatever is shown to a person — logs, errors —
goes through :meth:`FleetTarget.redact` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from r2d2voice.errors import UsageError

__all__ = ["FleetTarget", "is_fleet_url", "parse_fleet_url"]

_SCHEMES = ("postgresql://", "postgres://")
MASK = "***"
# libpq: the userinfo is whatever precedes the first '@' that comes before any '/'.
_URL_USERINFO = re.compile(r"^(postgres(?:ql)?://[^:@/]*:)([^@/]*)(@)", re.IGNORECASE)
_URL_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def is_fleet_url(text: str) -> bool:
    """True when ``text`` names a PostgreSQL server (``postgresql://`` or ``postgres://``)
    rather than a local SQLite file."""
    return text.lower().startswith(_SCHEMES)


@dataclass(frozen=True)
class FleetTarget:
    """One fleet server: the connection string as given, and what may be shown of it."""

    conninfo: str = field(repr=False)
    display: str
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def redact(self, text: str) -> str:
        """``text`` with every form of the password replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def __str__(self) -> str:
        return self.display


def _find_secrets(text: str) -> list[str]:
    found: list[str] = []
    for pattern in (_URL_USERINFO, _URL_QUERY_PASSWORD, _KV_PASSWORD):
        for match in pattern.finditer(text):
            raw = match.group(2)
            found += [raw, raw.strip("'"), unquote(raw)]
    return found


def _mask(text: str) -> str:
    text = _URL_USERINFO.sub(rf"\g<1>{MASK}\g<3>", text)
    text = _URL_QUERY_PASSWORD.sub(rf"\g<1>{MASK}", text)
    return _KV_PASSWORD.sub(rf"\g<1>{MASK}", text)


def parse_fleet_url(text: str) -> FleetTarget:
    """Check a connection string (without connecting) and make its :class:`FleetTarget`.

    Raises :class:`UsageError` with a one-line, password-free message when libpq cannot
    parse it.
    """
    secrets = _find_secrets(text)
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error as exc:
        shown = FleetTarget(text, _mask(text), _order(secrets))
        reason = shown.redact(" ".join(str(exc).split()))
        raise UsageError(f"invalid PostgreSQL connection string {shown}: {reason}") from None
    password = params.get("password")
    if isinstance(password, str) and password:
        secrets.append(password)
    return FleetTarget(text, _mask(text), _order(secrets))


def _order(secrets: list[str]) -> tuple[str, ...]:
    """Longest first (so a secret containing another is masked whole), no empties."""
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
