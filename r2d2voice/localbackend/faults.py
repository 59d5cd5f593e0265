"""Ways for the local backend to misbehave, and the real service's habits it can imitate (data).

The switches are listed, each with what the real service does, in :class:`Faults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CONNECT_CLOSE_CODES",
    "RESPONSE_FAULTS",
    "AfterResponse",
    "ConnectError",
    "Faults",
    "LiveClose",
    "LiveError",
    "ResponseFault",
    "TranscriptDelay",
    "TranscriptOutcome",
]

AfterResponse = Literal["abort", "close", "expire"]
ConnectError = Literal["invalid_api_key", "insufficient_quota", "model_not_found"]
TranscriptOutcome = Literal["completed", "empty", "failed", "never"]
TranscriptDelay = Literal["after_reply_start", "after_response_done"] | float
ResponseFault = Literal["failed", "max_output_tokens", "content_filter", "turn_detected"]
LiveClose = Literal["expired", "connection_lost", "content", "remote_hangup", "abort"]
LiveError = Literal["credit_balance_exhausted", "model_not_found"]

CONNECT_CLOSE_CODES: dict[str, int] = {
    "invalid_api_key": 3000, "insufficient_quota": 1013, "model_not_found": 4000,
}
RESPONSE_FAULTS: tuple[str, ...] = ("failed", "max_output_tokens", "content_filter",
                                    "turn_detected")
LIVE_CLOSES: tuple[str, ...] = ("expired", "connection_lost", "content", "remote_hangup",
                                "abort")
LIVE_ERRORS: tuple[str, ...] = ("credit_balance_exhausted", "model_not_found")


@dataclass(frozen=True)
class Faults:
    """Every switch is off by default: with ``Faults()`` the backend behaves as it always has.
    From ``serve-local`` each is ``--fault NAME[=VALUE]`` (:mod:`.fault_options`). Counters are
    per connection: responses are numbered from 1 in the order they are created; the after-N
    switches count ``response.done`` events sent. Per switch: what the real service does → what
    the local backend sends.

    - ``abort_after_responses=N``: a network blip → TCP reset after the Nth ``response.done``.
    - ``close_after_responses=N`` (``close_code``): closes a session → that close code after the
      Nth ``response.done``.
    - ``expire_after_responses=N``: ends a session → ``error`` session_expired, close 1000.
    - ``reply_delay_s=S``: slow to answer → waits S s before ``response.created``.
    - ``reply_seconds=S``: long replies → S s of beeps per reply.
    - ``junk``: unknown events, odd frames → an unknown event, non-JSON text, a binary frame and
      an ``error`` before each reply.
    - ``connect_error=KIND``: accepts the upgrade, then refuses a bad key / no quota / an unknown
      model → ``error`` ``invalid_api_key`` / ``insufficient_quota`` / ``model_not_found``, close
      3000 / 1013 / 4000 (invalid_api_key with ``BackendConfig.api_key``: only a wrong key, in
      place of the HTTP 401).
    - ``session_minutes=M``: ends every session at 60 minutes → ``error`` session_expired, close
      1001, M minutes after the session opened (``expires_at`` says so).
    - ``transcript_delay=WHEN``: transcribes asynchronously → the user item done without a
      transcript, ``...transcription.delta`` at once, ``.completed`` after_reply_start,
      after_response_done (of the next reply) or after S seconds.
    - ``transcript_outcome=WHAT``: transcription fails / is empty / never comes →
      ``...transcription.failed`` / ``.completed`` with "" / nothing.
    - ``fail_responses=N[:KIND]`` (repeatable): fails a response (rate limit), cuts it
      (max_output_tokens, content_filter) or cancels it (turn_detected) → response N ends
      ``failed`` (nothing streamed) or, halfway through, ``incomplete`` / ``cancelled``.
    - ``leftover_audio_deltas=N``: audio in flight after a cancel → N more audio deltas of the
      cancelled reply before its ``done`` events; the item does not hold them (a truncate at the
      received length gets "already shorter than").
    - ``benign_errors``: the service's VAD commits the whole input buffer, so a client's commit
      right after it gets ``input_audio_buffer_commit_empty`` → the same (without it the backend
      keeps the silence after a turn for the next one's padding, and such a commit succeeds).
      The other benign errors need no switch: ``response_cancel_not_active`` (a cancel after the
      server's own barge-in cancel, or after ``response.done``),
      ``conversation_already_has_active_response`` and a truncate "already shorter than" (see
      leftover_audio_deltas) come where the service gives them.
    - ``audio_delta_ms=A[-B]``: audio in bursts of ~250-430 ms → deltas of A..B ms.
    - ``server_ping_s=S``: a websocket ping every ~20 s → a ping frame every S s.
    - ``rate_limits``: ``rate_limits.updated`` after each ``response.done`` → the same.
    - ``extra_fields``: fields beyond the SDK's schema → ``phase`` on assistant messages,
      ``obfuscation`` on text deltas and ``reasoning_tokens`` (counted in output_tokens).

    GPT-Live (``/v1/live/sessions``; the switches above that fit apply too: ``reply_delay_s``,
    ``reply_seconds``, ``audio_delta_ms``):

    - ``live_close=REASON:N``: ends a session (its duration limit, a lost upstream, the safety
      filter, a remote hang-up) → ``session.closed`` with that reason and the final usage, then
      a close, after the Nth reply; ``abort:N``: the primary connection is lost → a TCP reset,
      no ``session.closed``.
    - ``live_error=CODE``: no credit left / an unknown model → ``session.start`` answered with
      an ``error`` ``credit_balance_exhausted`` / ``model_not_found``, then a close (1008).
    - ``live_reject=FIELD``: a strict service refuses a field (``session.delegation``) → an
      ``error`` ``unknown_parameter`` naming it, in answer to a ``session.start`` that has it.

    ``idle_timeout_ms`` needs no switch: the backend honours it when a session sets it on
    ``server_vad`` turn detection, as the service does.
    """

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
    #: accept the websocket, send this ``error``, close (see :data:`CONNECT_CLOSE_CODES`)
    connect_error: ConnectError | None = None
    #: end every session this many minutes after it opened (``session_expired``, 1001)
    session_minutes: float | None = None
    #: when the ``.completed`` transcription comes (None: with the commit, as always)
    transcript_delay: TranscriptDelay | None = None
    #: what the transcription of a user turn ends with
    transcript_outcome: TranscriptOutcome = "completed"
    #: (response number, how it ends) pairs
    fail_responses: tuple[tuple[int, ResponseFault], ...] = ()
    #: audio deltas still sent after a reply is cancelled
    leftover_audio_deltas: int = 0
    #: a VAD commit takes the whole input buffer (a client commit after it: commit_empty)
    benign_errors: bool = False
    #: (shortest, longest) audio per delta in ms, overriding ``BackendConfig.chunk_ms``
    audio_delta_ms: tuple[int, int] | None = None
    #: send a websocket ping this often (seconds)
    server_ping_s: float | None = None
    #: ``rate_limits.updated`` after every ``response.done``
    rate_limits: bool = False
    #: fields the real service adds beyond the SDK's schema
    extra_fields: bool = False
    #: GPT-Live: (how, after the Nth reply) the session ends
    live_close: tuple[LiveClose, int] | None = None
    #: GPT-Live: the error that answers ``session.start``, then the connection closes
    live_error: LiveError | None = None
    #: GPT-Live: a ``session.start`` field (dotted path) refused as unknown
    live_reject: str | None = None

    def __post_init__(self) -> None:
        _check(self.reply_delay_s >= 0, "reply_delay_s must be >= 0")
        for name in ("session_minutes", "server_ping_s", "reply_seconds"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be > 0")
        _check(self.leftover_audio_deltas >= 0, "leftover_audio_deltas must be >= 0")
        delay = self.transcript_delay
        _check(delay is None or delay in ("after_reply_start", "after_response_done")
               or (isinstance(delay, (int, float)) and delay >= 0),
               "transcript_delay must be after_reply_start, after_response_done or seconds >= 0")
        _check(self.transcript_outcome in ("completed", "empty", "failed", "never"),
               "transcript_outcome must be completed, empty, failed or never")
        _check(self.connect_error is None or self.connect_error in CONNECT_CLOSE_CODES,
               "connect_error must be one of " + ", ".join(CONNECT_CLOSE_CODES))
        for n, kind in self.fail_responses:
            _check(n >= 1 and kind in RESPONSE_FAULTS,
                   "fail_responses: response numbers start at 1; kinds: "
                   + ", ".join(RESPONSE_FAULTS))
        if self.live_close is not None:
            how, n = self.live_close
            _check(how in LIVE_CLOSES and n >= 1, "live_close: REASON:N, N >= 1, REASON one "
                   "of " + ", ".join(LIVE_CLOSES))
        _check(self.live_error is None or self.live_error in LIVE_ERRORS,
               "live_error must be one of " + ", ".join(LIVE_ERRORS))
        _check(self.live_reject is None or self.live_reject.startswith("session."),
               "live_reject must name a session.start field: session.NAME[.NAME...]")
        if self.audio_delta_ms is not None:
            lo, hi = self.audio_delta_ms
            _check(0 < lo <= hi, "audio_delta_ms must be 0 < shortest <= longest")

    def after_response(self, done: int) -> AfterResponse | None:
        """What to do once the ``done``-th ``response.done`` of a connection is sent."""
        if done == self.abort_after_responses:
            return "abort"
        if done == self.close_after_responses:
            return "close"
        if done == self.expire_after_responses:
            return "expire"
        return None

    def response_fault(self, number: int) -> ResponseFault | None:
        """How response ``number`` (from 1) of a connection is made to end, if at all."""
        return next((kind for n, kind in self.fail_responses if n == number), None)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)
