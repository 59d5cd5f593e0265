"""sd_notify(3) without libsystemd: readiness, status, watchdog and stopping messages.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket) to a
``Type=notify`` service; each message is one datagram of ``KEY=value`` lines. Outside systemd the
variable is unset and every method is a no-op, so callers never need to check.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)

__all__ = ["Notifier", "run_watchdog", "watchdog_interval"]


class Notifier:
    """Send sd_notify messages to ``$NOTIFY_SOCKET``; never raises, never blocks."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        if not address:
            return
        if address.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of the '@'.
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:
            log.debug("ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", address)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
        except OSError as exc:
            log.debug("cannot create the notify socket: %s", exc)
            return
        self._sock = sock

    @property
    def enabled(self) -> bool:
        """True when messages actually go somewhere."""
        return self._sock is not None

    def send(self, message: str) -> bool:
        """Send one raw message; return whether it was sent. Errors are logged at debug level."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:  # BlockingIOError (full queue), ENOENT, ECONNREFUSED, ...
            log.debug("sd_notify %r failed: %s", message, exc)
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="listening")``."""
        return self.send(_format(fields))

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.send("READY=1")
        text = _one_line(status)
        sent = self.notify(READY=1, STATUS=text)
        if sent:
            self._last_status = text
        return sent

    def status(self, text: str) -> bool:
        """Set the status line ``systemctl status`` shows; a repeat of the last one is skipped."""
        text = _one_line(text)
        if text == self._last_status:
            return False
        if not self.notify(STATUS=text):
            return False
        self._last_status = text
        return True

    def watchdog(self) -> bool:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _format(fields: Mapping[str, object]) -> str:
    return "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when not asked for.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; another pid (a child
    that inherited the environment) gets None.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, is_healthy: Callable[[], bool], interval: float) -> None:
    """Every ``interval`` seconds send ``WATCHDOG=1`` if ``is_healthy()``; runs until cancelled.

    Running on the trio loop is the point: a wedged event loop stops the pings too, and systemd
    restarts the service. An unhealthy pipeline (no capture frames lately) also stops them.
    """
    healthy = True
    while True:
        now_healthy = is_healthy()
        if now_healthy:
            notifier.watchdog()
            if not healthy:
                log.info("healthy again: watchdog pings resumed")
        elif healthy:
            log.warning("unhealthy: withholding watchdog pings")
        healthy = now_healthy
        await trio.sleep(interval)
