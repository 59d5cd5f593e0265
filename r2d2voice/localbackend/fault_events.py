"""The events the faults and habits of :mod:`.faults` send, worded as the service words them."""

from __future__ import annotations

import base64
import hashlib

from r2d2voice.localbackend.faults import ResponseFault
from r2d2voice.localbackend.wire import EventMaker, Json

__all__ = [
    "TOKENS_PER_MINUTE",
    "connect_error",
    "junk_frames",
    "obfuscation",
    "rate_limits_updated",
    "response_status_details",
    "session_expired",
    "transcription_failed",
]

TOKENS_PER_MINUTE = 40_000
REQUESTS_PER_MINUTE = 5_000


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


def session_expired(event: EventMaker, minutes: float = 60) -> Json:
    """The ``error`` the service sends when a session hits its maximum duration."""
    return event("error", error={
        "type": "invalid_request_error", "code": "session_expired", "param": None,
        "event_id": None,
        "message": f"Your session hit the maximum duration of {minutes:g} minutes.",
    })


def connect_error(event: EventMaker, kind: str, model: str) -> Json:
    """The ``error`` sent on an accepted websocket just before the service closes it."""
    messages = {
        "invalid_api_key": ("invalid_request_error", "Incorrect API key provided. You can find "
                            "your API key at https://platform.openai.com/account/api-keys."),
        "insufficient_quota": ("insufficient_quota", "You exceeded your current quota, please "
                               "check your plan and billing details."),
        "model_not_found": ("invalid_request_error", f"The model `{model}` does not exist or "
                            "you do not have access to it."),
    }
    type_, message = messages[kind]
    return event("error", error={"type": type_, "code": kind, "message": message,
                                 "param": None, "event_id": None})


def transcription_failed(event: EventMaker, item_id: str) -> Json:
    return event("conversation.item.input_audio_transcription.failed", item_id=item_id,
                 content_index=0, error={
                     "type": "transcription_error", "code": "audio_unintelligible",
                     "message": "Audio could not be transcribed.", "param": None})


def response_status_details(status: str, fault: ResponseFault | None,
                            cancel_reason: str | None) -> Json:
    """``response.status_details`` for a response ending with ``status``."""
    if status == "cancelled":
        return {"type": "cancelled", "reason": cancel_reason or "client_cancelled"}
    if status == "incomplete":
        return {"type": "incomplete", "reason": fault}
    if status == "failed":
        return {"type": "failed", "error": {
            "type": "tokens", "code": "rate_limit_exceeded",
            "message": f"Rate limit reached on tokens per min (TPM): Limit {TOKENS_PER_MINUTE}. "
                       "Please try again in 1.5s."}}
    return {"type": "completed"}


def rate_limits_updated(event: EventMaker, tokens_used: int) -> Json:
    """What the service sends after a ``response.done`` (the limits with this one counted)."""
    remaining = max(TOKENS_PER_MINUTE - tokens_used, 0)
    return event("rate_limits.updated", rate_limits=[
        {"name": "requests", "limit": REQUESTS_PER_MINUTE, "remaining": REQUESTS_PER_MINUTE - 1,
         "reset_seconds": 0.012},
        {"name": "tokens", "limit": TOKENS_PER_MINUTE, "remaining": remaining,
         "reset_seconds": round(60 * tokens_used / TOKENS_PER_MINUTE, 3)},
    ])


def obfuscation(delta: str) -> str:
    """Padding like the service's ``obfuscation`` field: evens out the sizes of text deltas."""
    pad = base64.b64encode(hashlib.sha256(delta.encode()).digest()).decode("ascii")
    return pad[: max(1, 16 - len(delta) % 16)]
