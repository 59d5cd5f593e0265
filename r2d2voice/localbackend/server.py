"""A Realtime-compatible local backend speaking OpenAI's GA Realtime protocol.

Offline stand-in for the service, and the peer of the test suite: an energy VAD
(:mod:`r2d2voice.vad`) detects turns in the appended audio, and every reply is a burst of
R2-D2 beeps (:mod:`r2d2voice.beeps`) with an honest transcript. No speech understanding.

Shape: :class:`LocalSession` is the protocol logic of one connection, sans-IO (client
message in, list of server events and reply requests out); :class:`_Reply` is one response
(it builds its events and tracks what was sent). The trio part below runs, per connection, a
nursery of three tasks: the reader (client messages -> session), the replier (streams one
reply at a time, cancellable) and the one sender (the only writer to the websocket).

Protocol summary (server VAD mode, what a turn looks like on the wire)::

    input_audio_buffer.speech_started   item_id = the user item to come
    input_audio_buffer.speech_stopped
    input_audio_buffer.committed
    conversation.item.added / conversation.item.done            (user, input_audio)
    conversation.item.input_audio_transcription.completed       (only if transcription is
                                                                 configured, as the service)
    response.created, response.output_item.added, conversation.item.added,
    response.content_part.added,
    (response.output_audio.delta, response.output_audio_transcript.delta) * n,
    response.output_audio.done, response.output_audio_transcript.done,
    response.content_part.done, response.output_item.done, conversation.item.done,
    response.done

A cancelled response (``speech_started`` with ``interrupt_response``, or ``response.cancel``)
closes what was opened — audio/transcript/part ``done`` with the partial transcript,
``output_item.done`` and ``conversation.item.done`` with status ``incomplete`` — then
``response.done`` with status ``cancelled`` and ``status_details.reason`` ``turn_detected`` or
``client_cancelled``. One response at a time per connection, as the service.

Not modelled: text-only output, tools, ``idle_timeout_ms``, noise reduction, non-PCM formats;
``semantic_vad`` is accepted and run as the energy VAD with the ``server_vad`` defaults.

The listener is ``trio.serve_tcp`` + ``trio_websocket.wrap_server_stream`` (rather than
``serve_websocket``) so the connection owns its TCP stream: ``Faults.abort_after_responses``
resets it without touching trio-websocket internals.

Usage numbers are synthetic but deterministic: input audio tokens = 10 per second of user
audio in the conversation, input text tokens = len(text) // 4 over the instructions, text
items and assistant transcripts; output audio tokens = 20 per second of reply audio sent,
output text tokens = len(transcript sent) // 4; cached tokens 0.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import hashlib
import hmac
import json
import logging
import math
import secrets
import socket
import string
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np
import trio
import trio_websocket

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.audio.vad import EnergyVad, SpeechStarted

__all__ = ["BackendConfig", "Faults", "LocalSession", "serve_local"]

log = logging.getLogger("r2d2voice.localbackend.server")

RATE = 24000
MAX_MESSAGE_BYTES = 16 * 2**20
"""Largest client message accepted (an append of ~4 min of base64 audio)."""

MAX_BUFFER_BYTES = 15 * 2**20
"""Input audio buffer cap, as the service's 15 MiB (~5.5 min): the oldest audio is dropped."""

MIN_COMMIT_MS = 100
"""A manual commit needs at least this much audio, like the service."""

HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 1.0
OUTGOING_BUFFER = 64
"""Server events queued for the sender. Policy: wait (producers block; nothing is dropped)."""

REPLY_BUFFER = 2
"""Replies queued for the replier (one finishing after a cancel + the next). Policy: wait."""

DEFAULT_MODEL = "gpt-realtime"
DEFAULT_INSTRUCTIONS = "You are R2-D2. You answer in beeps and whistles."

_ALPHABET = string.ascii_letters + string.digits

Json = dict[str, Any]
Outgoing = Json | str | bytes
"""What the sender writes: an event (JSON text), or a raw text/binary frame (fault injection)."""


def _new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(21))


def _event(type_: str, **body: Any) -> Json:
    return {"type": type_, "event_id": _new_id("event"), **body}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Faults:
    """Ways to misbehave, for tests of the client's resilience. All off by default.

    Counters are per connection and count ``response.done`` events actually sent
    (completed or cancelled).
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


@dataclass(frozen=True)
class BackendConfig:
    """How the local backend behaves.

    ``api_key``: when set, the handshake must carry ``Authorization: Bearer <api_key>``,
    otherwise it is rejected with HTTP 401; when None any key (or none) is accepted.
    ``reply_seconds``: length of every reply. ``chunk_ms``: audio per
    ``response.output_audio.delta``. ``realtime_factor``: replies stream this many times
    faster than real time (1.0 = real time).
    """

    api_key: str | None = field(default=None, repr=False)
    reply_seconds: float = 1.0
    chunk_ms: int = 100
    realtime_factor: float = 1.0
    faults: Faults = field(default_factory=Faults)
    #: for tests: called with (session id, client event) for every JSON client event received
    observer: Callable[[str, dict[str, Any]], None] | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.reply_seconds > 0:
            raise ValueError(f"reply_seconds must be > 0, got {self.reply_seconds!r}")
        if not self.chunk_ms > 0:
            raise ValueError(f"chunk_ms must be > 0, got {self.chunk_ms!r}")
        if not self.realtime_factor > 0:
            raise ValueError(f"realtime_factor must be > 0, got {self.realtime_factor!r}")


# --------------------------------------------------------------------------- sans-IO core


class ClientError(Exception):
    """A client event the session refuses: becomes an ``error`` event; the session goes on."""

    def __init__(
        self, message: str, *, code: str | None = "invalid_value", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclass(eq=False)
class _Item:
    """One conversation item as the server keeps it."""

    id: str
    role: str
    wire: Json  # the item as sent to the client
    audio_ms: int = 0  # audio held by the item (user input or assistant output)
    text: str | None = None  # text content, or the transcript of the audio
    digest: bytes = b""  # hash of the user's input (audio or text): seeds the reply


@dataclass
class CancelReply:
    """Instruction for the trio layer: cancel this reply's streaming now."""

    reply: _Reply


Output = Union[Json, "_Reply", CancelReply]


def _default_turn_detection() -> Json:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }


def _default_session(model: str) -> Json:
    pcm = {"type": "audio/pcm", "rate": RATE}
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": _new_id("sess"),
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {
                "format": dict(pcm),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": _default_turn_detection(),
            },
            "output": {"format": dict(pcm), "voice": "marin", "speed": 1.0},
        },
    }


def _require(
    cond: bool, message: str, param: str | None, code: str = "invalid_value"
) -> None:
    if not cond:
        raise ClientError(message, code=code, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(d: Json, allowed: set[str], where: str) -> None:
    for key in d:
        _require(
            key in allowed, f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}",
            "unknown_parameter",
        )


def _check_format(fmt: Any, where: str) -> None:
    _require(isinstance(fmt, dict), f"Invalid type for '{where}': expected an object.", where)
    _require(
        fmt.get("type", "audio/pcm") == "audio/pcm" and fmt.get("rate", RATE) == RATE,
        "The local backend supports only audio/pcm at 24000 Hz.", where,
    )


def _decode_pcm(b64: Any, param: str) -> bytes:
    _require(isinstance(b64, str), f"Invalid type for '{param}': expected a base64 string.", param)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"Invalid '{param}': not valid base64.", param=param) from None
    _require(len(raw) % 2 == 0, f"Invalid '{param}': PCM16 needs an even byte count.", param)
    return raw


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


class LocalSession:
    """Protocol state of one connection, sans-IO.

    :meth:`receive` takes one client message and returns what to do, in order: server
    events (dicts) to send, :class:`_Reply` objects to stream, :class:`CancelReply`
    instructions. The streamer reports back through :meth:`finish_reply` and the
    :class:`_Reply` methods.
    """

    def __init__(self, config: BackendConfig, model: str = DEFAULT_MODEL) -> None:
        self.config = config
        self.session = _default_session(model)
        self.conversation_id = _new_id("conv")
        self.items: list[_Item] = []
        self.active: _Reply | None = None  # the reply in progress (not cancelled, not done)
        self._total_samples = 0  # input samples appended since the session started
        self._buffer = bytearray()  # input audio not yet committed
        self._buffer_start = 0  # stream sample index of _buffer[0]
        self._dropped_samples = 0
        self._vad: EnergyVad | None = None
        self._vad_base = 0  # stream sample index where the VAD's clock starts
        self._speech: SpeechStarted | None = None
        self._speech_item_id: str | None = None
        self._configure_vad()

    # -- public --------------------------------------------------------------------

    def created(self) -> Json:
        """The first event of every connection."""
        return _event("session.created", session=copy.deepcopy(self.session))

    def receive(self, message: str | bytes) -> list[Output]:
        """Handle one client message (a websocket frame)."""
        if isinstance(message, bytes):
            return [self._error("Binary frames are not supported; send JSON text.", "invalid_json")]
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return [self._error("The message is not valid JSON.", "invalid_json")]
        if not isinstance(event, dict):
            return [self._error("A client event must be a JSON object.", "invalid_json")]
        if self.config.observer is not None:
            self.config.observer(self.session["id"], event)
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        type_ = event.get("type")
        handler = self._handlers.get(type_) if isinstance(type_, str) else None
        if handler is None:
            return [
                self._error(
                    f"Invalid value: {type_!r}. Supported values are: "
                    + ", ".join(f"'{t}'" for t in self._handlers) + ".",
                    "invalid_value", param="type", event_id=event_id,
                )
            ]
        try:
            return handler(self, event)
        except ClientError as exc:
            return [self._error(exc.message, exc.code, param=exc.param, event_id=event_id)]

    def finish_reply(self, reply: _Reply) -> None:
        """The replier is done streaming ``reply`` (completed or cancelled)."""
        if self.active is reply:
            self.active = None

    def item(self, item_id: str) -> _Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    # -- helpers -------------------------------------------------------------------

    def _error(
        self,
        message: str,
        code: str | None,
        *,
        param: str | None = None,
        event_id: str | None = None,
        type_: str = "invalid_request_error",
    ) -> Json:
        log.info("client error: %s (%s)", message, code)
        return _event(
            "error",
            error={
                "type": type_, "code": code, "message": message, "param": param,
                "event_id": event_id,
            },
        )

    @property
    def turn_detection(self) -> Json | None:
        return self.session["audio"]["input"]["turn_detection"]

    def _configure_vad(self) -> None:
        td = self.turn_detection
        self._speech = None
        self._speech_item_id = None
        self._vad_base = self._total_samples
        if td is None:
            self._vad = None
            return
        # semantic_vad has none of these keys: the energy VAD runs with the server_vad defaults.
        params = {k: v for k, v in _default_turn_detection().items()
                  if k in ("threshold", "prefix_padding_ms", "silence_duration_ms")}
        params.update({k: td[k] for k in params if td.get(k) is not None})
        self._vad = EnergyVad(RATE, **params)

    def _previous_id(self, index: int) -> str | None:
        return self.items[index - 1].id if index > 0 else None

    def _insert(self, item: _Item, previous_item_id: str | None = None) -> str | None:
        """Add ``item`` after ``previous_item_id`` (default: at the end); return its predecessor."""
        if previous_item_id is None:
            self.items.append(item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            prev = self.item(previous_item_id)
            _require(
                prev is not None, f"Item with item_id not found: {previous_item_id}",
                "previous_item_id", "item_create_invalid_previous_item_id",
            )
            self.items.insert(self.items.index(prev) + 1, item)  # type: ignore[arg-type]
        return self._previous_id(self.items.index(item))

    def _buffer_samples(self) -> int:
        return len(self._buffer) // 2

    def _slice_buffer(self, start: int, end: int) -> bytes:
        """Buffered audio between two stream sample indexes (clipped to what is held)."""
        lo = max(start - self._buffer_start, 0)
        hi = max(min(end - self._buffer_start, self._buffer_samples()), lo)
        return bytes(self._buffer[2 * lo : 2 * hi])

    def _drop_buffer_before(self, sample: int) -> None:
        n = min(max(sample - self._buffer_start, 0), self._buffer_samples())
        del self._buffer[: 2 * n]
        self._buffer_start += n

    def _commit(self, audio: bytes, speech_ms: int, item_id: str | None = None) -> list[Output]:
        """Turn ``audio`` into a user item: committed, item added/done, transcription."""
        item_id = item_id or _new_id("item")
        transcription = self.session["audio"]["input"]["transcription"]
        audio_ms = _ms(len(audio) // 2)
        transcript = f"(speech, {speech_ms / 1000:.1f} s)"
        content: Json = {"type": "input_audio", "transcript": None}
        wire: Json = {
            "id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [content],
        }
        item = _Item(item_id, "user", wire, audio_ms, None, hashlib.sha256(audio).digest())
        previous = self._insert(item)
        out: list[Output] = [
            _event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
            _event("conversation.item.added", previous_item_id=previous,
                   item=copy.deepcopy(wire)),
        ]
        if transcription is not None:
            content["transcript"] = transcript
            item.text = transcript
        out.append(_event("conversation.item.done", previous_item_id=previous,
                          item=copy.deepcopy(wire)))
        if transcription is not None:
            audio_tokens = audio_ms * 10 // 1000
            text_tokens = len(transcript) // 4
            out.append(_event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id, content_index=0, transcript=transcript,
                usage={
                    "type": "tokens", "input_tokens": audio_tokens,
                    "output_tokens": text_tokens, "total_tokens": audio_tokens + text_tokens,
                    "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
                },
            ))
        return out

    def _start_reply(self, metadata: Any = None) -> _Reply:
        seconds = self.config.faults.reply_seconds or self.config.reply_seconds
        seed = next((it.digest for it in reversed(self.items) if it.role == "user"), b"")
        audio, transcript = r2_reply(seed, seconds, RATE)
        reply = _Reply(self, audio, transcript, metadata)
        self.active = reply
        return reply

    def _cancel_active(self, reason: str) -> list[Output]:
        reply = self.active
        if reply is None:
            return []
        reply.cancel_reason = reason
        self.active = None
        return [CancelReply(reply)]

    def input_usage(self, exclude: str | None = None) -> tuple[int, int]:
        """(audio, text) input tokens of the conversation, as a response would be billed."""
        audio_ms = sum(it.audio_ms for it in self.items if it.role == "user" and it.id != exclude)
        text = len(self.session.get("instructions") or "") // 4
        text += sum(
            len(it.text) // 4 for it in self.items
            if it.text and it.id != exclude and (it.role != "user" or it.audio_ms == 0)
        )
        return audio_ms * 10 // 1000, text

    # -- client event handlers -----------------------------------------------------

    def _on_session_update(self, event: Json) -> list[Output]:
        upd = event.get("session")
        _require(isinstance(upd, dict), "Missing required parameter: 'session'.", "session",
                 "missing_required_parameter")
        _require("type" in upd, "Missing required parameter: 'session.type'.", "session.type",
                 "missing_required_parameter")
        _require(upd["type"] == "realtime",
                 "The local backend supports only session.type 'realtime'.", "session.type")
        new = copy.deepcopy(self.session)
        _check_keys(upd, {
            "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
            "max_output_tokens", "tracing", "truncation", "prompt", "include",
        }, "session")
        for key in ("model", "tools", "tool_choice", "max_output_tokens", "tracing",
                    "truncation", "prompt", "include"):
            if key in upd:
                new[key] = copy.deepcopy(upd[key])
        if "instructions" in upd:
            _require(isinstance(upd["instructions"], str),
                     "Invalid type for 'session.instructions': expected a string.",
                     "session.instructions")
            new["instructions"] = upd["instructions"]
        if "output_modalities" in upd:
            _require(upd["output_modalities"] == ["audio"],
                     "The local backend replies with audio only: output_modalities ['audio'].",
                     "session.output_modalities")
        vad_changed = False
        audio = upd.get("audio")
        if audio is not None:
            _require(isinstance(audio, dict),
                     "Invalid type for 'session.audio': expected an object.", "session.audio")
            _check_keys(audio, {"input", "output"}, "session.audio")
            inp = audio.get("input")
            if inp is not None:
                vad_changed = self._update_input(new, inp)
            out = audio.get("output")
            if out is not None:
                self._update_output(new, out)
        self.session = new
        if vad_changed:
            self._configure_vad()
        return [_event("session.updated", session=copy.deepcopy(self.session))]

    def _update_input(self, new: Json, inp: Any) -> bool:
        where = "session.audio.input"
        _require(isinstance(inp, dict), f"Invalid type for '{where}': expected an object.", where)
        _check_keys(inp, {"format", "transcription", "noise_reduction", "turn_detection"}, where)
        target = new["audio"]["input"]
        if "format" in inp:
            _check_format(inp["format"], f"{where}.format")
            target["format"] = {"type": "audio/pcm", "rate": RATE}
        if "transcription" in inp:
            tr = inp["transcription"]
            _require(tr is None or isinstance(tr, dict),
                     f"Invalid type for '{where}.transcription': expected an object or null.",
                     f"{where}.transcription")
            target["transcription"] = copy.deepcopy(tr)
        if "noise_reduction" in inp:
            nr = inp["noise_reduction"]
            _require(nr is None or isinstance(nr, dict),
                     f"Invalid type for '{where}.noise_reduction': expected an object or null.",
                     f"{where}.noise_reduction")
            target["noise_reduction"] = copy.deepcopy(nr)
        if "turn_detection" not in inp:
            return False
        td = inp["turn_detection"]
        if td is None:
            target["turn_detection"] = None
            return True
        p = f"{where}.turn_detection"
        _require(isinstance(td, dict), f"Invalid type for '{p}': expected an object or null.", p)
        _check_keys(td, {
            "type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
            "interrupt_response", "idle_timeout_ms", "eagerness",
        }, p)
        _require(td.get("type") in ("server_vad", "semantic_vad"),
                 f"Invalid value for '{p}.type': expected 'server_vad' or 'semantic_vad'.",
                 f"{p}.type")
        if "threshold" in td:
            v = td["threshold"]
            _require(v is None or (_is_num(v) and 0.0 <= v <= 1.0),
                     f"Invalid '{p}.threshold': expected a number between 0.0 and 1.0.",
                     f"{p}.threshold")
        for key in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
            if key in td:
                v = td[key]
                _require(v is None or (_is_int(v) and v >= 0),
                         f"Invalid '{p}.{key}': expected a non-negative integer.", f"{p}.{key}")
        for key in ("create_response", "interrupt_response"):
            if key in td:
                _require(td[key] is None or isinstance(td[key], bool),
                         f"Invalid '{p}.{key}': expected a boolean.", f"{p}.{key}")
        old = target["turn_detection"]
        merged = _default_turn_detection()
        if old is not None and old.get("type") == td["type"]:
            merged.update(old)
        merged.update({k: v for k, v in td.items() if v is not None})
        if td["type"] == "semantic_vad":
            for key in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
                merged.pop(key, None)
            merged.setdefault("eagerness", "auto")
        target["turn_detection"] = merged
        return True

    def _update_output(self, new: Json, out: Any) -> None:
        where = "session.audio.output"
        _require(isinstance(out, dict), f"Invalid type for '{where}': expected an object.", where)
        _check_keys(out, {"format", "voice", "speed"}, where)
        target = new["audio"]["output"]
        if "format" in out:
            _check_format(out["format"], f"{where}.format")
        if "voice" in out:
            v = out["voice"]
            _require(isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("id"), str)),
                     f"Invalid type for '{where}.voice'.", f"{where}.voice")
            target["voice"] = copy.deepcopy(v)
        if "speed" in out:
            v = out["speed"]
            _require(_is_num(v) and 0.25 <= v <= 1.5,
                     f"Invalid '{where}.speed': expected a number between 0.25 and 1.5.",
                     f"{where}.speed")
            target["speed"] = v

    def _on_append(self, event: Json) -> list[Output]:
        raw = _decode_pcm(event.get("audio"), "audio")
        if not raw:
            return []
        self._buffer += raw
        self._total_samples += len(raw) // 2
        if len(self._buffer) > MAX_BUFFER_BYTES:  # policy: drop the oldest audio, count it
            excess = (len(self._buffer) - MAX_BUFFER_BYTES) // 2
            self._drop_buffer_before(self._buffer_start + excess)
            if not self._dropped_samples:
                log.warning("input audio buffer full (15 MiB): dropping the oldest audio")
            self._dropped_samples += excess
        if self._vad is None:
            return []
        out: list[Output] = []
        td = self.turn_detection or {}
        base_ms = _ms(self._vad_base)
        for ev in self._vad.feed(np.frombuffer(raw, dtype="<i2")):
            if isinstance(ev, SpeechStarted):
                self._speech = ev
                self._speech_item_id = _new_id("item")
                out.append(_event(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=base_ms + ev.audio_start_ms, item_id=self._speech_item_id,
                ))
                if td.get("interrupt_response", True):
                    out += self._cancel_active("turn_detected")
                continue
            start, item_id = self._speech, self._speech_item_id
            self._speech = self._speech_item_id = None
            assert start is not None and item_id is not None
            end_ms = base_ms + ev.audio_end_ms
            out.append(_event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms,
                              item_id=item_id))
            start_sample = self._vad_base + start.audio_start_ms * RATE // 1000
            end_sample = self._vad_base + ev.audio_end_ms * RATE // 1000
            audio = self._slice_buffer(start_sample, end_sample)
            self._drop_buffer_before(end_sample)
            out += self._commit(audio, ev.audio_end_ms - start.onset_ms, item_id)
            if td.get("create_response", True):
                if self.active is None:
                    out.append(self._start_reply())
                else:
                    log.info("turn %s ends while a reply is active: no new reply", item_id)
        if self._speech is None:
            # Not in a turn: keep only what prefix padding may still need.
            keep = (self._vad.prefix_padding_ms + 500) * RATE // 1000
            self._drop_buffer_before(self._total_samples - keep)
        return out

    def _on_commit(self, event: Json) -> list[Output]:
        samples = self._buffer_samples()
        _require(
            _ms(samples) >= MIN_COMMIT_MS,
            f"Error committing input audio buffer: buffer too small. Expected at least "
            f"{MIN_COMMIT_MS}ms of audio, but buffer only has {samples * 1000 / RATE:.2f}ms "
            f"of audio.", None, "input_audio_buffer_commit_empty",
        )
        audio = bytes(self._buffer)
        self._drop_buffer_before(self._total_samples)
        item_id = self._speech_item_id
        self._configure_vad()  # a manual commit ends any turn in progress
        return self._commit(audio, _ms(samples), item_id)

    def _on_clear(self, event: Json) -> list[Output]:
        self._drop_buffer_before(self._total_samples)
        self._configure_vad()
        return [_event("input_audio_buffer.cleared")]

    def _on_item_create(self, event: Json) -> list[Output]:
        raw = event.get("item")
        _require(isinstance(raw, dict), "Missing required parameter: 'item'.", "item",
                 "missing_required_parameter")
        _require(raw.get("type") == "message",
                 "The local backend supports only items of type 'message'.", "item.type")
        role = raw.get("role")
        allowed = {
            "user": ("input_text", "input_audio"),
            "system": ("input_text",),
            "assistant": ("output_text", "output_audio"),
        }
        _require(role in allowed, "Invalid 'item.role': expected user, assistant or system.",
                 "item.role")
        content = raw.get("content")
        _require(isinstance(content, list) and len(content) > 0,
                 "Invalid 'item.content': expected a non-empty array.", "item.content")
        wire_content: list[Json] = []
        texts: list[str] = []
        audio_ms = 0
        digest = hashlib.sha256()
        for i, part in enumerate(content):
            p = f"item.content[{i}]"
            _require(isinstance(part, dict) and part.get("type") in allowed[role],
                     f"Invalid '{p}.type' for role {role}: expected one of "
                     + ", ".join(allowed[role]) + ".", f"{p}.type")
            kind = part["type"]
            if kind in ("input_text", "output_text"):
                _require(isinstance(part.get("text"), str),
                         f"Missing required parameter: '{p}.text'.", f"{p}.text",
                         "missing_required_parameter")
                texts.append(part["text"])
                digest.update(part["text"].encode())
                wire_content.append({"type": kind, "text": part["text"]})
            else:
                transcript = part.get("transcript")
                _require(transcript is None or isinstance(transcript, str),
                         f"Invalid type for '{p}.transcript'.", f"{p}.transcript")
                if "audio" in part:
                    pcm = _decode_pcm(part["audio"], f"{p}.audio")
                    audio_ms += _ms(len(pcm) // 2)
                    digest.update(pcm)
                if transcript:
                    texts.append(transcript)
                wire_content.append({"type": kind, "transcript": transcript})
        item_id = raw.get("id")
        if item_id is None:
            item_id = _new_id("item")
        _require(isinstance(item_id, str) and item_id != "",
                 "Invalid type for 'item.id': expected a string.", "item.id")
        _require(self.item(item_id) is None, f"Item with id {item_id} already exists.",
                 "item.id", "item_create_duplicate_id")
        previous_item_id = event.get("previous_item_id")
        _require(previous_item_id is None or isinstance(previous_item_id, str),
                 "Invalid type for 'previous_item_id': expected a string.", "previous_item_id")
        wire = {
            "id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": role, "content": wire_content,
        }
        item = _Item(item_id, role, wire, audio_ms, " ".join(texts) or None, digest.digest())
        previous = self._insert(item, previous_item_id)
        return [
            _event("conversation.item.added", previous_item_id=previous,
                   item=copy.deepcopy(wire)),
            _event("conversation.item.done", previous_item_id=previous,
                   item=copy.deepcopy(wire)),
        ]

    def _on_item_retrieve(self, event: Json) -> list[Output]:
        item = self._find(event, "item_retrieve_invalid_item_id")
        return [_event("conversation.item.retrieved", item=copy.deepcopy(item.wire))]

    def _find(self, event: Json, code: str) -> _Item:
        item_id = event.get("item_id")
        _require(isinstance(item_id, str), "Missing required parameter: 'item_id'.", "item_id",
                 "missing_required_parameter")
        item = self.item(item_id)
        _require(item is not None, f"Item with item_id not found: {item_id}", "item_id", code)
        return item  # type: ignore[return-value]

    def _on_item_truncate(self, event: Json) -> list[Output]:
        item = self._find(event, "item_truncate_invalid_item_id")
        content_index = event.get("content_index", 0)
        end = event.get("audio_end_ms")
        _require(_is_int(content_index) and content_index == 0,
                 "Invalid 'content_index': the item has one content part (0).", "content_index")
        _require(item.role == "assistant" and bool(item.wire["content"])
                 and item.wire["content"][0].get("type") == "output_audio",
                 "Only assistant messages with audio can be truncated.", "item_id",
                 "item_truncate_invalid_item_id")
        _require(_is_int(end) and end >= 0,
                 "Invalid 'audio_end_ms': expected a non-negative integer.", "audio_end_ms")
        _require(end <= item.audio_ms,
                 f"Audio content of {item.audio_ms}ms is shorter than {end}ms.",
                 "audio_end_ms", "invalid_value")
        item.audio_ms = end
        # Like the service: the transcript of unheard audio is removed from the context.
        item.text = None
        item.wire["content"][0]["transcript"] = None
        return [_event("conversation.item.truncated", item_id=item.id, content_index=0,
                       audio_end_ms=end)]

    def _on_item_delete(self, event: Json) -> list[Output]:
        item = self._find(event, "item_delete_invalid_item_id")
        self.items.remove(item)
        return [_event("conversation.item.deleted", item_id=item.id)]

    def _on_response_create(self, event: Json) -> list[Output]:
        params = event.get("response")
        _require(params is None or isinstance(params, dict),
                 "Invalid type for 'response': expected an object.", "response")
        params = params or {}
        if "output_modalities" in params:
            _require(params["output_modalities"] == ["audio"],
                     "The local backend replies with audio only: output_modalities ['audio'].",
                     "response.output_modalities")
        _require(self.active is None,
                 "Conversation already has an active response in progress: "
                 f"{self.active.id if self.active else ''}. Wait until the response is finished "
                 "before creating a new one.", None,
                 "conversation_already_has_active_response")
        return [self._start_reply(params.get("metadata"))]

    def _on_response_cancel(self, event: Json) -> list[Output]:
        response_id = event.get("response_id")
        active = self.active
        _require(active is not None and response_id in (None, active.id),
                 "Cancellation failed: no active response found.", None,
                 "response_cancel_not_active")
        return self._cancel_active("client_cancelled")

    def _on_output_clear(self, event: Json) -> list[Output]:
        raise ClientError("output_audio_buffer.clear is only supported for WebRTC and SIP.",
                          code="unsupported", param="type")

    _handlers: ClassVar[dict[str, Callable[[LocalSession, Json], list[Output]]]] = {
        "session.update": _on_session_update,
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
        "conversation.item.create": _on_item_create,
        "conversation.item.retrieve": _on_item_retrieve,
        "conversation.item.truncate": _on_item_truncate,
        "conversation.item.delete": _on_item_delete,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
        "output_audio_buffer.clear": _on_output_clear,
    }


class _Reply:
    """One response: builds its events; the replier reports each event it sent."""

    OPENING = 4  # response.created, output_item.added, conversation.item.added, part.added

    def __init__(self, session: LocalSession, audio: np.ndarray, transcript: str,
                 metadata: Any) -> None:
        self.session = session
        self.id = _new_id("resp")
        self.item_id = _new_id("item")
        self.audio = audio.astype("<i2").tobytes()
        self.transcript = transcript
        self.metadata = metadata
        self.cancel_reason: str | None = None
        self.cancel_scope: Any = None  # set by the trio layer
        self.stage = 0  # opening events sent
        self.bytes_sent = 0
        self.transcript_sent = ""
        self.item: _Item | None = None
        self._previous: str | None = None

    # -- event builders ------------------------------------------------------------

    def _response(self, status: str, output: list[Json], usage: Json | None) -> Json:
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif status == "completed":
            details = {"type": "completed"}
        return {
            "object": "realtime.response", "id": self.id, "status": status,
            "status_details": details, "output": output,
            "conversation_id": self.session.conversation_id, "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {
                "format": {"type": "audio/pcm", "rate": RATE},
                "voice": self.session.session["audio"]["output"]["voice"],
            }},
            "usage": usage, "metadata": self.metadata,
        }

    def _wire_item(self, status: str) -> Json:
        content = []
        if self.stage >= 4:
            content = [{"type": "output_audio", "transcript": self.transcript_sent}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message",
                "status": status, "role": "assistant", "content": content}

    def _ids(self) -> Json:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0,
                "content_index": 0}

    def steps(self, chunk_samples: int) -> Iterator[Json | None]:
        """Opening events, then per chunk an audio delta and maybe a transcript delta.

        ``None`` between chunks means: wait one chunk's pacing time.
        """
        yield _event("response.created", response=self._response("in_progress", [], None))
        yield _event("response.output_item.added", response_id=self.id, output_index=0,
                     item=self._wire_item("in_progress"))
        self._previous = self.session._previous_id(len(self.session.items))
        yield _event("conversation.item.added", previous_item_id=self._previous,
                     item=self._wire_item("in_progress"))
        yield _event("response.content_part.added", **self._ids(),
                     part={"type": "audio", "transcript": ""})
        chunk_bytes = 2 * chunk_samples
        n_chunks = max(1, math.ceil(len(self.audio) / chunk_bytes))
        words = self.transcript.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        per_chunk: list[list[str]] = [[] for _ in range(n_chunks)]
        for i, piece in enumerate(pieces):
            per_chunk[i * n_chunks // len(pieces)].append(piece)
        for j in range(n_chunks):
            if j:
                yield None
            chunk = self.audio[j * chunk_bytes : (j + 1) * chunk_bytes]
            if chunk:
                yield _event("response.output_audio.delta", **self._ids(),
                             delta=base64.b64encode(chunk).decode("ascii"))
            if per_chunk[j]:
                yield _event("response.output_audio_transcript.delta", **self._ids(),
                             delta="".join(per_chunk[j]))

    def sent(self, event: Json) -> None:
        """The sender's queue took ``event``: update what the client knows."""
        type_ = event["type"]
        if type_ == "response.output_audio.delta":
            self.bytes_sent += len(base64.b64decode(event["delta"]))
            if self.item is not None:
                self.item.audio_ms = _ms(self.bytes_sent // 2)
        elif type_ == "response.output_audio_transcript.delta":
            self.transcript_sent += event["delta"]
            if self.item is not None:
                self.item.text = self.transcript_sent
        else:
            self.stage += 1
            if type_ == "conversation.item.added":
                self.item = _Item(self.item_id, "assistant", self._wire_item("in_progress"))
                self.session._insert(self.item)

    def closing(self) -> list[Json]:
        """Events that end the response, given what was sent and whether it was cancelled."""
        cancelled = self.cancel_reason is not None
        status = "cancelled" if cancelled else "completed"
        item_status = "incomplete" if cancelled else "completed"
        out: list[Json] = []
        if self.stage == 0:
            out.append(_event("response.created",
                              response=self._response("in_progress", [], None)))
        if self.stage >= 4:
            part = {"type": "audio", "transcript": self.transcript_sent}
            out += [
                _event("response.output_audio.done", **self._ids()),
                _event("response.output_audio_transcript.done", **self._ids(),
                       transcript=self.transcript_sent),
                _event("response.content_part.done", **self._ids(), part=part),
            ]
        output: list[Json] = []
        if self.stage >= 2:
            wire = self._wire_item(item_status)
            output = [wire]
            out.append(_event("response.output_item.done", response_id=self.id,
                              output_index=0, item=wire))
            if self.stage >= 3 and self.item is not None:
                self.item.wire = copy.deepcopy(wire)
                out.append(_event("conversation.item.done", previous_item_id=self._previous,
                                  item=copy.deepcopy(wire)))
        in_audio, in_text = self.session.input_usage(exclude=self.item_id)
        out_audio = self.bytes_sent // 2 * 20 // RATE
        out_text = len(self.transcript_sent) // 4
        usage = {
            "total_tokens": in_audio + in_text + out_audio + out_text,
            "input_tokens": in_audio + in_text,
            "output_tokens": out_audio + out_text,
            "input_token_details": {
                "text_tokens": in_text, "audio_tokens": in_audio, "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        }
        out.append(_event("response.done", response=self._response(status, output, usage)))
        return out


# --------------------------------------------------------------------------- trio layer


def _junk() -> list[Outgoing]:
    return [
        _event("local.fault.junk", note="an event type the client does not know"),
        "this frame is not JSON {",
        b"\x00\x01 binary frame \xff",
        _event("error", error={
            "type": "server_error", "code": "local_fault_junk", "param": None, "event_id": None,
            "message": "Non-fatal test error from the local backend (Faults.junk).",
        }),
    ]


async def _read_loop(
    ws: trio_websocket.WebSocketConnection,
    session: LocalSession,
    out: trio.MemorySendChannel[Outgoing],
    replies: trio.MemorySendChannel[_Reply],
) -> None:
    """Client messages -> session -> events (to the sender) and replies (to the replier)."""
    async with out, replies:
        await out.send(session.created())
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            for action in session.receive(message):
                if isinstance(action, _Reply):
                    action.cancel_scope = trio.CancelScope()
                    await replies.send(action)
                elif isinstance(action, CancelReply):
                    action.reply.cancel_scope.cancel()
                else:
                    await out.send(action)


async def _reply_loop(
    session: LocalSession,
    replies: trio.MemoryReceiveChannel[_Reply],
    out: trio.MemorySendChannel[Outgoing],
    config: BackendConfig,
) -> None:
    """Stream replies one at a time; a cancelled reply still gets its closing events."""
    chunk_samples = max(1, RATE * config.chunk_ms // 1000)
    pace = config.chunk_ms / 1000 / config.realtime_factor
    async with replies, out:
        try:
            async for reply in replies:
                await _stream_reply(session, reply, out, config, chunk_samples, pace)
        except trio.BrokenResourceError:
            pass  # the sender is gone (connection closed or fault)


async def _stream_reply(
    session: LocalSession,
    reply: _Reply,
    out: trio.MemorySendChannel[Outgoing],
    config: BackendConfig,
    chunk_samples: int,
    pace: float,
) -> None:
    faults = config.faults
    with reply.cancel_scope:
        if faults.junk:
            for junk in _junk():
                await out.send(junk)
        if faults.reply_delay_s > 0:
            await trio.sleep(faults.reply_delay_s)
        for step in reply.steps(chunk_samples):
            if step is None:
                await trio.sleep(pace)
            else:
                await out.send(step)
                reply.sent(step)
    session.finish_reply(reply)
    log.info("response %s %s after %.2f s of audio", reply.id,
             "cancelled" if reply.cancel_reason else "completed", reply.bytes_sent / 2 / RATE)
    for event in reply.closing():
        await out.send(event)


#: pause between the Nth ``response.done`` and the reset (``Faults.abort_after_responses``)
ABORT_DELAY_S = 0.2


async def _abort(stream: trio.abc.Stream) -> None:
    """Reset the TCP connection: no close frame, no FIN (SO_LINGER 0 makes close send RST)."""
    if isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _send_loop(
    ws: trio_websocket.WebSocketConnection,
    stream: trio.abc.Stream,
    out: trio.MemoryReceiveChannel[Outgoing],
    faults: Faults,
) -> None:
    """The only writer to the websocket; applies the after-N-responses faults."""
    done = 0
    async with out:
        async for message in out:
            data = message if isinstance(message, (str, bytes)) else json.dumps(message)
            try:
                await ws.send_message(data)
            except trio_websocket.ConnectionClosed:
                return
            if not (isinstance(message, dict) and message.get("type") == "response.done"):
                continue
            done += 1
            if done == faults.abort_after_responses:
                log.info("fault: aborting the TCP connection after %d responses", done)
                # A reset discards whatever the peer's kernel has not handed to it yet; wait a
                # moment so the reply itself arrives and the blip hits between turns.
                await trio.sleep(ABORT_DELAY_S)
                await _abort(stream)
                return
            if done == faults.close_after_responses:
                log.info("fault: closing with code %d after %d responses", faults.close_code, done)
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await ws.aclose(faults.close_code, "local backend fault injection")
                return
            if done == faults.expire_after_responses:
                log.info("fault: session expired after %d responses", done)
                error = _event("error", error={
                    "type": "invalid_request_error", "code": "session_expired", "param": None,
                    "event_id": None,
                    "message": "Your session hit the maximum duration of 60 minutes.",
                })
                try:
                    await ws.send_message(json.dumps(error))
                except trio_websocket.ConnectionClosed:
                    return
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await ws.aclose(1000, "session expired")
                return


def _header(request: trio_websocket.WebSocketRequest, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value
    return None


def _auth_error(api_key: str, request: trio_websocket.WebSocketRequest) -> Json | None:
    """None if the handshake carries the right bearer token, else the 401 body."""
    got = _header(request, b"authorization")
    if got is None:
        return {"error": {
            "message": "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).",
            "type": "invalid_request_error", "param": None, "code": None,
        }}
    if hmac.compare_digest(got, b"Bearer " + api_key.encode()):
        return None
    return {"error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
    }}


async def _serve_request(
    request: trio_websocket.WebSocketRequest, stream: trio.abc.Stream, config: BackendConfig
) -> None:
    remote = request.remote
    if config.api_key is not None:
        body = _auth_error(config.api_key, request)
        if body is not None:
            log.info("rejected %s: %s", remote, body["error"]["message"])
            await request.reject(
                401, extra_headers=[(b"Content-Type", b"application/json")],
                body=json.dumps(body).encode(),
            )
            return
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
    model = (query.get("model") or [DEFAULT_MODEL])[0]
    ws = await request.accept()
    session = LocalSession(config, model)
    log.info("session %s opened from %s (model %s)", session.session["id"], remote, model)
    try:
        out_send, out_recv = trio.open_memory_channel[Outgoing](OUTGOING_BUFFER)
        reply_send, reply_recv = trio.open_memory_channel[_Reply](REPLY_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_loop, ws, stream, out_recv, config.faults)
            nursery.start_soon(_reply_loop, session, reply_recv, out_send.clone(), config)
            # BrokenResourceError: the sender is gone (connection closed or fault).
            with contextlib.suppress(trio.BrokenResourceError):
                await _read_loop(ws, session, out_send, reply_send)
            nursery.cancel_scope.cancel()
    finally:
        # -inf: we are being cancelled, i.e. the server is shutting down ("going away").
        code = 1001 if trio.current_effective_deadline() == -math.inf else 1000
        # Shutting down, trio-websocket's reader is cancelled too: the peer's close reply
        # cannot be read, so only send the close frame (tiny deadline) and drop the TCP.
        wait = CLOSE_TIMEOUT_S if code == 1000 else 0.05
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait):
            await ws.aclose(code)
        log.info("session %s closed", session.session["id"])


async def _handle_stream(stream: trio.SocketStream, config: BackendConfig) -> None:
    """One TCP connection: websocket handshake, then the session."""
    try:
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, message_queue_size=4, max_message_size=MAX_MESSAGE_BYTES,
                    receive_buffer_size=64 * 1024,
                )
            if request is not None:
                await _serve_request(request, stream, config)
            nursery.cancel_scope.cancel()  # stop trio-websocket's reader task
    except Exception:
        log.exception("connection failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_local(
    host: str = "127.0.0.1",
    port: int = 8765,
    config: BackendConfig | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local backend until cancelled; ``task_status.started(bound_port)``.

    Any path is accepted (``/v1/realtime?model=...``; the model is echoed in the session).
    Each connection gets its own session. Cancelling the caller's scope closes every
    connection (close code 1001, at most :data:`CLOSE_TIMEOUT_S` each) and the listener.
    """
    config = config or BackendConfig()

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_stream(stream, config)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=host))
        bound = listeners[0].socket.getsockname()[1]
        log.info("local Realtime backend listening on ws://%s:%d", host, bound)
        task_status.started(bound)
