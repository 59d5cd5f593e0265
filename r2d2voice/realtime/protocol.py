"""Sans-IO core of the GA OpenAI Realtime protocol.

Three parts, none of which does I/O or imports trio:

* builders for every client event the appliance sends (plain dicts, ready for ``json.dumps``);
* :func:`parse_event`, turning one websocket message into a small frozen event record;
* :class:`Conversation`, the state machine fed those records. It answers each with a list of
  *actions* (play this audio, store this transcript, send this control event, …) that the trio
  shell carries out.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("r2d2voice.realtime.protocol")

RATE = 24000
#: Service error codes that no retry can fix: the run ends with exit 3.
FATAL_ERROR_CODES = frozenset(
    {
        "invalid_api_key",
        "insufficient_quota",
        "billing_hard_limit_reached",
        "model_not_found",
        "invalid_model",
        "account_deactivated",
    }
)
#: Error codes after which the service closes the session; a new session can go on.
SESSION_END_CODES = frozenset({"session_expired"})

_event_ids = itertools.count(1)


def _client(type_: str, **body: Any) -> dict[str, Any]:
    return {"type": type_, "event_id": f"evt_r2_{next(_event_ids)}", **body}


# --------------------------------------------------------------------------- client events


@dataclass(frozen=True)
class SessionConfig:
    """What ``session.update`` asks of the service."""

    instructions: str
    voice: str = "alloy"
    transcribe_model: str = "gpt-4o-transcribe"
    vad_threshold: float = 0.5
    vad_prefix_ms: int = 300
    vad_silence_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    #: keep this share of the context when it overflows (``truncation.retention_ratio``)
    retention_ratio: float | None = None
    #: conversation tokens (after instructions) that trigger truncation; None: model default
    token_limit: int | None = None


def session_update(cfg: SessionConfig) -> dict[str, Any]:
    """``session.update`` in the GA shape: ``session.type = "realtime"``, ``audio.input/output``."""
    pcm = {"type": "audio/pcm", "rate": RATE}
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": cfg.instructions,
        "audio": {
            "input": {
                "format": pcm,
                "transcription": {"model": cfg.transcribe_model},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": cfg.vad_threshold,
                    "prefix_padding_ms": cfg.vad_prefix_ms,
                    "silence_duration_ms": cfg.vad_silence_ms,
                    "create_response": cfg.create_response,
                    "interrupt_response": cfg.interrupt_response,
                },
            },
            "output": {"format": dict(pcm), "voice": cfg.voice},
        },
    }
    if cfg.retention_ratio is not None:
        truncation: dict[str, Any] = {"type": "retention_ratio",
                                      "retention_ratio": cfg.retention_ratio}
        if cfg.token_limit:
            truncation["token_limits"] = {"post_instructions": cfg.token_limit}
        session["truncation"] = truncation
    return _client("session.update", session=session)


def input_audio_append(pcm: bytes) -> dict[str, Any]:
    """``input_audio_buffer.append`` with 24 kHz mono PCM16 little-endian audio."""
    return _client("input_audio_buffer.append", audio=base64.b64encode(pcm).decode("ascii"))


def input_audio_commit() -> dict[str, Any]:
    return _client("input_audio_buffer.commit")


def input_audio_clear() -> dict[str, Any]:
    return _client("input_audio_buffer.clear")


def item_create_text(role: str, text: str) -> dict[str, Any]:
    """``conversation.item.create`` of a text message (used to carry context to a new session)."""
    part = "output_text" if role == "assistant" else "input_text"
    item = {"type": "message", "role": role, "content": [{"type": part, "text": text}]}
    return _client("conversation.item.create", item=item)


def item_truncate(item_id: str, audio_end_ms: int, content_index: int = 0) -> dict[str, Any]:
    return _client(
        "conversation.item.truncate",
        item_id=item_id,
        content_index=content_index,
        audio_end_ms=audio_end_ms,
    )


def item_delete(item_id: str) -> dict[str, Any]:
    return _client("conversation.item.delete", item_id=item_id)


def response_create() -> dict[str, Any]:
    return _client("response.create")


def response_cancel(response_id: str | None = None) -> dict[str, Any]:
    if response_id is None:
        return _client("response.cancel")
    return _client("response.cancel", response_id=response_id)


# --------------------------------------------------------------------------- server events


@dataclass(frozen=True)
class SessionCreated:
    session_id: str
    model: str | None


@dataclass(frozen=True)
class SessionUpdated:
    session_id: str


@dataclass(frozen=True)
class SpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class InputCommitted:
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class UserTranscript:
    item_id: str
    transcript: str
    raw: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True)
class UserTranscriptFailed:
    item_id: str
    message: str


@dataclass(frozen=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True)
class OutputItemAdded:
    response_id: str
    item_id: str
    role: str | None


@dataclass(frozen=True)
class AudioDelta:
    response_id: str
    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True)
class TranscriptDelta:
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True)
class TranscriptDone:
    response_id: str
    item_id: str
    transcript: str
    raw: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    status: str
    usage: dict[str, Any] | None
    status_details: dict[str, Any] | None = None


@dataclass(frozen=True)
class ItemTruncated:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class ServiceError:
    type: str
    code: str | None
    message: str
    event_id: str | None = None

    @property
    def fatal(self) -> bool:
        """True when retrying cannot help (bad key, no quota, unknown model)."""
        return self.code in FATAL_ERROR_CODES or self.type == "authentication_error"

    @property
    def ends_session(self) -> bool:
        return self.code in SESSION_END_CODES


@dataclass(frozen=True)
class Ignored:
    """A well-formed event the appliance has no use for (or an unknown type)."""

    type: str


ServerEvent = (
    SessionCreated | SessionUpdated | SpeechStarted | SpeechStopped | InputCommitted
    | UserTranscript | UserTranscriptFailed | ResponseCreated | OutputItemAdded | AudioDelta
    | TranscriptDelta | TranscriptDone | ResponseDone | ItemTruncated | ServiceError | Ignored
)


class ProtocolError(ValueError):
    """A message that is not a usable server event (non-JSON, binary, missing fields)."""


def _s(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"{d.get('type')!r} event without string field {key!r}")
    return v


def _i(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{d.get('type')!r} event without integer field {key!r}")
    return v


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def parse_event(message: str | bytes) -> ServerEvent:
    """Turn one websocket message into an event record.

    Raises ProtocolError for binary frames, non-JSON text and known event types missing the
    fields the appliance needs; unknown types come back as :class:`Ignored`.
    """
    if isinstance(message, bytes):
        raise ProtocolError(f"binary frame of {len(message)} bytes")
    try:
        d = json.loads(message)
    except ValueError:
        raise ProtocolError(f"non-JSON text frame: {message[:60]!r}") from None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise ProtocolError("JSON frame without an event type")
    t: str = d["type"]
    if t == "response.output_audio.delta":
        try:
            pcm = base64.b64decode(_s(d, "delta"), validate=True)
        except binascii.Error:
            raise ProtocolError("audio delta that is not base64") from None
        return AudioDelta(_s(d, "response_id"), _s(d, "item_id"), pcm)
    if t == "response.output_audio_transcript.delta":
        return TranscriptDelta(_s(d, "response_id"), _s(d, "item_id"), _s(d, "delta"))
    if t == "response.output_audio_transcript.done":
        return TranscriptDone(_s(d, "response_id"), _s(d, "item_id"), _s(d, "transcript"),
                              raw=message)
    if t == "conversation.item.input_audio_transcription.completed":
        return UserTranscript(_s(d, "item_id"), _s(d, "transcript"), raw=message)
    if t == "conversation.item.input_audio_transcription.failed":
        err = _dict(d.get("error"))
        return UserTranscriptFailed(_s(d, "item_id"), str(err.get("message") or "failed"))
    if t == "input_audio_buffer.speech_started":
        return SpeechStarted(_s(d, "item_id"), _i(d, "audio_start_ms"))
    if t == "input_audio_buffer.speech_stopped":
        return SpeechStopped(_s(d, "item_id"), _i(d, "audio_end_ms"))
    if t == "input_audio_buffer.committed":
        prev = d.get("previous_item_id")
        return InputCommitted(_s(d, "item_id"), prev if isinstance(prev, str) else None)
    if t == "response.created":
        return ResponseCreated(_s(_dict(d.get("response")), "id"))
    if t == "response.output_item.added":
        item = _dict(d.get("item"))
        role = item.get("role")
        return OutputItemAdded(_s(d, "response_id"), _s(item, "id"),
                               role if isinstance(role, str) else None)
    if t == "response.done":
        r = _dict(d.get("response"))
        usage = r.get("usage")
        details = r.get("status_details")
        return ResponseDone(
            _s(r, "id"),
            str(r.get("status") or "completed"),
            usage if isinstance(usage, dict) else None,
            details if isinstance(details, dict) else None,
        )
    if t in ("session.created", "session.updated"):
        s = _dict(d.get("session"))
        sid = s.get("id") if isinstance(s.get("id"), str) else ""
        if t == "session.created":
            model = s.get("model")
            return SessionCreated(sid, model if isinstance(model, str) else None)
        return SessionUpdated(sid)
    if t == "conversation.item.truncated":
        return ItemTruncated(_s(d, "item_id"), _i(d, "audio_end_ms"))
    if t == "error":
        e = _dict(d.get("error"))
        code = e.get("code")
        ev = e.get("event_id")
        return ServiceError(
            str(e.get("type") or "error"),
            code if isinstance(code, str) else None,
            str(e.get("message") or ""),
            ev if isinstance(ev, str) else None,
        )
    return Ignored(t)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Play:
    """Queue reply audio (24 kHz mono PCM16 bytes) for the speaker."""

    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True)
class BargeIn:
    """The user started speaking: stop the speaker now and report what was played
    with :meth:`Conversation.interrupted`."""

    user_item_id: str


@dataclass(frozen=True)
class Send:
    """Send this client event."""

    event: dict[str, Any]


@dataclass(frozen=True)
class StoreSession:
    service_session_id: str
    model: str | None


@dataclass(frozen=True)
class StoreMessage:
    role: str
    item_id: str
    text: str
    created_at: float
    response_id: str | None = None
    raw: str | None = field(default=None, repr=False)
    partial: bool = False


@dataclass(frozen=True)
class StoreInterrupted:
    item_id: str
    played_ms: int


@dataclass(frozen=True)
class StoreResponse:
    response_id: str
    status: str
    usage: dict[str, Any] | None
    created_at: float | None
    done_at: float
    #: end of user speech -> first reply audio received, in ms (None without a speech turn)
    first_audio_ms: float | None = None


@dataclass(frozen=True)
class StoreLatency:
    """End of user speech -> first reply sample handed to the speaker, in ms."""

    response_id: str
    first_played_ms: float


@dataclass(frozen=True)
class StoreError:
    type: str
    code: str | None
    message: str
    fatal: bool


Action = (
    Play | BargeIn | Send | StoreSession | StoreMessage | StoreInterrupted | StoreResponse
    | StoreLatency | StoreError
)


# --------------------------------------------------------------------------- conversation


@dataclass
class _Reply:
    response_id: str | None
    created_at: float
    text: list[str] = field(default_factory=list)
    audio_samples: int = 0
    done: bool = False


class Conversation:
    """What one Realtime session has said so far, fed with events, answering with actions.

    ``now`` arguments are wall-clock seconds (``time.time()``), supplied by the shell so this
    stays deterministic under test.
    """

    MAX_TRACKED_ITEMS = 256

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.model: str | None = None
        self.configured = False
        self.user_speaking = False
        self.turns_committed = 0
        self.responses_done = 0
        self.active_response: str | None = None
        self.last_error: ServiceError | None = None
        self.usage_totals: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self._commit_times: OrderedDict[str, float] = OrderedDict()
        self._replies: OrderedDict[str, _Reply] = OrderedDict()
        self._response_created: dict[str, float] = {}
        self._speech_stopped_at: float | None = None
        self._first_audio: dict[str, float] = {}
        #: reply item -> (response id, end of the user's speech) until its first sample plays
        self.awaiting_play: OrderedDict[str, tuple[str, float]] = OrderedDict()

    # -- queries the shell uses ----------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No user speech in progress and no reply being generated."""
        return not self.user_speaking and self.active_response is None

    def received_samples(self, item_id: str) -> int:
        reply = self._replies.get(item_id)
        return reply.audio_samples if reply else 0

    # -- feeding -------------------------------------------------------------------------
    def receive(self, event: ServerEvent, now: float) -> list[Action]:
        """Apply one server event; return what the shell should do about it."""
        handler = getattr(self, "_on_" + type(event).__name__, None)
        return handler(event, now) if handler else []

    def first_played(self, item_id: str, at: float) -> list[Action]:
        """The first sample of reply ``item_id`` reached the speaker at wall time ``at``."""
        pending = self.awaiting_play.pop(item_id, None)
        if pending is None:
            return []
        response_id, stopped = pending
        return [StoreLatency(response_id, round((at - stopped) * 1000, 1))]

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker was stopped during ``item_id`` after ``played_samples`` at 24 kHz.

        Truncates the service's copy to what was heard (never more than was received), or deletes
        the item if nothing was heard, and marks the stored message interrupted.
        """
        played = max(0, min(played_samples, self.received_samples(item_id)))
        played_ms = played * 1000 // RATE
        send = item_truncate(item_id, played_ms) if played_ms > 0 else item_delete(item_id)
        return [Send(send), StoreInterrupted(item_id, played_ms)]

    def flush(self, now: float) -> list[Action]:
        """The connection is ending: store transcripts that never got their ``.done``."""
        out: list[Action] = []
        for item_id, reply in self._replies.items():
            if not reply.done and reply.text:
                out.append(StoreMessage("assistant", item_id, "".join(reply.text),
                                        reply.created_at, reply.response_id, partial=True))
                reply.done = True
        return out

    # -- handlers ------------------------------------------------------------------------
    def _on_SessionCreated(self, ev: SessionCreated, now: float) -> list[Action]:
        self.session_id, self.model = ev.session_id, ev.model
        return [StoreSession(ev.session_id, ev.model)]

    def _on_SessionUpdated(self, ev: SessionUpdated, now: float) -> list[Action]:
        self.configured = True
        return []

    def _on_SpeechStarted(self, ev: SpeechStarted, now: float) -> list[Action]:
        self.user_speaking = True
        return [BargeIn(ev.item_id)]

    def _on_SpeechStopped(self, ev: SpeechStopped, now: float) -> list[Action]:
        self.user_speaking = False
        self._speech_stopped_at = now
        self._remember(self._commit_times, ev.item_id, now)
        return []

    def _on_InputCommitted(self, ev: InputCommitted, now: float) -> list[Action]:
        self.user_speaking = False
        self.turns_committed += 1
        if ev.item_id not in self._commit_times:
            self._remember(self._commit_times, ev.item_id, now)
        return []

    def _on_UserTranscript(self, ev: UserTranscript, now: float) -> list[Action]:
        created = self._commit_times.get(ev.item_id, now)
        return [StoreMessage("user", ev.item_id, ev.transcript, created, raw=ev.raw)]

    def _on_UserTranscriptFailed(self, ev: UserTranscriptFailed, now: float) -> list[Action]:
        return [StoreError("transcription_failed", None, f"{ev.item_id}: {ev.message}", False)]

    def _on_ResponseCreated(self, ev: ResponseCreated, now: float) -> list[Action]:
        self.active_response = ev.response_id
        self._response_created[ev.response_id] = now
        return []

    def _on_OutputItemAdded(self, ev: OutputItemAdded, now: float) -> list[Action]:
        self._reply(ev.item_id, ev.response_id, now)
        return []

    def _on_AudioDelta(self, ev: AudioDelta, now: float) -> list[Action]:
        reply = self._reply(ev.item_id, ev.response_id, now)
        reply.audio_samples += len(ev.pcm) // 2
        if ev.response_id not in self._first_audio:
            self._first_audio[ev.response_id] = now
            stopped = self._speech_stopped_at
            created = self._response_created.get(ev.response_id)
            if stopped is not None and created is not None and stopped <= created:
                self._remember(self.awaiting_play, ev.item_id, (ev.response_id, stopped))
        return [Play(ev.item_id, ev.pcm)] if ev.pcm else []

    def _on_TranscriptDelta(self, ev: TranscriptDelta, now: float) -> list[Action]:
        self._reply(ev.item_id, ev.response_id, now).text.append(ev.delta)
        return []

    def _on_TranscriptDone(self, ev: TranscriptDone, now: float) -> list[Action]:
        reply = self._reply(ev.item_id, ev.response_id, now)
        reply.text = [ev.transcript]
        reply.done = True
        return [StoreMessage("assistant", ev.item_id, ev.transcript, reply.created_at,
                             ev.response_id, raw=ev.raw)]

    def _on_ResponseDone(self, ev: ResponseDone, now: float) -> list[Action]:
        if self.active_response == ev.response_id:
            self.active_response = None
        self.responses_done += 1
        if ev.usage:
            for k in ("input_tokens", "output_tokens"):
                v = ev.usage.get(k)
                if isinstance(v, int):
                    self.usage_totals[k] += v
        created = self._response_created.pop(ev.response_id, None)
        first = self._first_audio.pop(ev.response_id, None)
        latency = None
        stopped = self._speech_stopped_at
        if first is not None and stopped is not None and created is not None and stopped <= created:
            latency = round((first - stopped) * 1000, 1)
        out: list[Action] = [StoreResponse(ev.response_id, ev.status, ev.usage, created, now,
                                           latency)]
        # a reply cut off before its transcript finished: keep what was said
        for item_id, reply in self._replies.items():
            if reply.response_id == ev.response_id and not reply.done and reply.text:
                reply.done = True
                out.append(StoreMessage("assistant", item_id, "".join(reply.text),
                                        reply.created_at, reply.response_id, partial=True))
        return out

    def _on_ServiceError(self, ev: ServiceError, now: float) -> list[Action]:
        self.last_error = ev
        return [StoreError(ev.type, ev.code, ev.message, ev.fatal)]

    # -- helpers -------------------------------------------------------------------------
    def _reply(self, item_id: str, response_id: str | None, now: float) -> _Reply:
        reply = self._replies.get(item_id)
        if reply is None:
            reply = _Reply(response_id, now)
            self._remember(self._replies, item_id, reply)
        elif reply.response_id is None:
            reply.response_id = response_id
        return reply

    def _remember(self, d: OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        while len(d) > self.MAX_TRACKED_ITEMS:
            d.popitem(last=False)
