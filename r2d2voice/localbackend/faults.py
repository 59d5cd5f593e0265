"""Ways for the local backend to misbehave, for tests of a client's resilience (data only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r2d2voice.localbackend.wire import EventMaker, Json

__all__ = ["AfterResponse", "Faults", "junk_frames", "session_expired"]

AfterResponse = Literal["abort", "close", "expire"]


@dataclass(frozen=True)
class Faults:
    """All off by default. Counters are per connection and count ``response.done`` events
    actually sent (completed or cancelled)."""

    #: reset the TCP connection (no close frame) right after the Nth response.done
    abort_after_responses: int | None = None
    #: close the websocket with ``close_code`` right after the Nth response.done
    close_after_responses: int | None = None
    close_code: int = 1011
    #: send an ``error`` with code ``session_expired``, then close (1000), after the Nth one
    expire_after_responses: int | None = None
    #: wait this long before a reply starts (before ``response.created``)
    reply_delay_s: float = 0.0
    #: override :attr:`BackendConfig.reply_seconds` (e.g. a long reply to talk over)
    reply_seconds: float | None = None
    #: before each reply, send an unknown event type, a non-JSON text frame, a binary
    #: frame and a non-fatal ``error`` event
    junk: bool = False

    def after_response(self, done: int) -> AfterResponse | None:
        """What to do once the ``done``-th ``response.done`` of a connection is sent."""
        if done == self.abort_after_responses:
            return "abort"
        if done == self.close_after_responses:
            return "close"
        if done == self.expire_after_responses:
            return "expire"
        return None


def junk_frames(event: EventMaker) -> list[Json | str | bytes]:
    """What :attr:`Faults.junk` sends before each reply."""
    return [
        event("local.fault.junk", note="an event type the client does not know"),
        "this frame is not JSON {",
        b"\x00\x01 binary frame \xff",
        event("error", error={
            "type": "server_error", "code": "local_fault_junk", "param": None, "event_id": None,
            "message": "Non-fatal test error from the local backend (Faults.junk).",
        }),
    ]


def session_expired(event: EventMaker) -> Json:
    """The ``error`` the service sends when a session hits its maximum duration."""
    return event("error", error={
        "type": "invalid_request_error", "code": "session_expired", "param": None,
        "event_id": None, "message": "Your session hit the maximum duration of 60 minutes.",
    })
