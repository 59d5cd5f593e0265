"""Logging fit for a terminal or for the systemd journal, with the API key scrubbed."""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<N>message``: the journal adds its own timestamps and reads the syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


class RedactFilter(logging.Filter):
    """Replace every occurrence of the secrets with ``***`` in the final message."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        msg = record.getMessage()
        clean = msg
        for s in self.secrets:
            clean = clean.replace(s, "***")
        if clean != msg or record.exc_info:
            record.msg, record.args = clean, None
            if record.exc_info:
                text = logging.Formatter().formatException(record.exc_info)
                for s in self.secrets:
                    text = text.replace(s, "***")
                record.exc_text, record.exc_info = text, None
        return True


def setup_logging(level: str = "INFO", secrets: list[str] | None = None) -> None:
    """Configure the root logger on stderr: journal style under systemd, timestamps otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    handler.addFilter(RedactFilter(secrets or []))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # trio-websocket logs every frame at debug; keep it quieter than ours
    logging.getLogger("trio-websocket").setLevel(max(logging.INFO, root.level))


def add_secret(secret: str | None) -> None:
    """Register one more value to scrub from every handler of the root logger."""
    if not secret:
        return
    for h in logging.getLogger().handlers:
        for f in h.filters:
            if isinstance(f, RedactFilter) and secret not in f.secrets and len(secret) >= 4:
                f.secrets.append(secret)
