"""The protocol logic of one local GPT-Live connection, sans-IO.

:meth:`LiveLocal.receive` takes one client message and returns what to do, in order: server
events (dicts) to send, :class:`Speak` (a :class:`LiveReply` to stream), :class:`Hush` (stop
the reply the person talks over), :class:`Hangup` (close once what is queued went out). The
shell reports each reply it finished with :meth:`LiveLocal.reply_done`.

Like the Realtime side it understands no words. The energy VAD (:mod:`.turns`) finds the
person's turns in the appended audio; their transcript is ``(speech`` when speech starts,
empty fragments while it goes on, and ``, 2.3 s)`` when it ends (fragments on the timeline,
as a streaming recogniser sends them);
each turn is answered with beeps, or as the ``--script`` says: a function call goes through
Responses delegation when the session configured it (``session.delegation.created``, the
hosted model's stream in ``response.event``; the outputs come back with
``response.item.create`` + ``response.create``), else through client delegation (answered
with ``session.commentary.append``). Speech starting inside what the robot is saying stops
it, as GPT-Live handles interruptions itself. The timeline is the input audio's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.live_reply import LiveReply
from r2d2voice.localbackend.live_start import start_session
from r2d2voice.localbackend.script import Script
from r2d2voice.localbackend.session import SESSION_LIFETIME_S
from r2d2voice.localbackend.session_config import default_turn_detection, vad_params
from r2d2voice.localbackend.tools import quote_outputs
from r2d2voice.localbackend.turns import InputAudio, TurnStarted
from r2d2voice.localbackend.wire import (
    ClientError,
    EventMaker,
    IdFactory,
    Json,
    decode_pcm,
    ms,
    random_id,
    require,
)

__all__ = ["USAGE_EVERY_MS", "Hangup", "Hush", "LiveLocal", "Speak"]

USAGE_EVERY_MS = 15_000
"""``session.usage.updated`` every this much of the timeline (and after each reply)."""

HEARING_MS = 400
"""While the person speaks, an empty input fragment this often: the recogniser still hears
speech it has no words for (a streaming one sends words this often)."""


@dataclass(frozen=True)
class Speak:
    """For the shell: stream ``reply``."""

    reply: LiveReply


@dataclass(frozen=True)
class Hush:
    """For the shell: stop streaming ``reply`` now (the person talks over it)."""

    reply: LiveReply


@dataclass(frozen=True)
class Hangup:
    """For the shell: close with ``code`` once what is queued went out (``abort``: a TCP reset
    with no close frame)."""

    code: int
    reason: str
    abort: bool = False


Output = Json | Speak | Hush | Hangup
Handler = Callable[["LiveLocal", Json], list[Output]]


class LiveLocal:
    """Protocol state of one Live connection (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float], new_id: IdFactory = random_id,
                 reply_seconds: float = 1.0, faults: Faults | None = None,
                 script: Script | None = None,
                 observer: Callable[[str, Json], None] | None = None) -> None:
        self.event = EventMaker(new_id)
        self.clock = clock
        self.reply_seconds = reply_seconds
        self.faults = faults or Faults()
        self.script = script or Script()
        self.observer = observer
        self.id = new_id("sess")
        self.expires_at = int(clock()) + SESSION_LIFETIME_S
        self.session: Json | None = None  # the resolved session, once started
        self.input = InputAudio(vad_params(default_turn_detection()))
        self.speaking: LiveReply | None = None  # the latest reply, until it is done
        self.replies = 0  # replies done
        self.turns = 0  # the person's turns answered (script turns used)
        self.closed = False
        self._said_until = 0  # timeline ms where the robot's planned speech ends
        self._turn_start = 0
        self._heard_to = 0  # timeline ms of the last input fragment of the turn in progress
        self._next_usage = USAGE_EVERY_MS
        self._calls: dict[str, str] = {}  # delegated calls awaiting output: call id -> name
        self._outputs: list[tuple[str, str]] = []  # (tool name, output) not yet answered
        self._waiting: str | None = None  # a client delegation awaiting its commentary
        self._sequence = 0  # sequence_number of nested Responses events

    @property
    def timeline_ms(self) -> int:
        return max(ms(self.input.position), self._said_until)

    @property
    def delegation(self) -> Json:
        return (self.session or {}).get("delegation") or {"type": "client"}

    # -- public ------------------------------------------------------------------------------
    def receive(self, message: str | bytes) -> list[Output]:
        """Handle one client message (a websocket frame)."""
        if self.closed:
            return []
        if isinstance(message, bytes):
            return [self._error("Binary frames are not supported; send JSON text.",
                                "invalid_json")]
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return [self._error("The message is not valid JSON.", "invalid_json")]
        if not isinstance(event, dict):
            return [self._error("A client event must be a JSON object.", "invalid_json")]
        if self.observer is not None:
            self.observer(self.id, event)
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        kind = event.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        try:
            require(handler is not None, f"Invalid value: {kind!r}. Supported values are: "
                    + ", ".join(f"'{t}'" for t in self._handlers) + ".", "type")
            require(self.session is not None or kind == "session.start",
                    "Send session.start first and wait for session.started.", None,
                    "session_not_started")
            assert handler is not None
            return handler(self, event)
        except ClientError as exc:
            return [self._error(exc.message, exc.code, exc.param, client_id)]

    def reply_done(self, reply: LiveReply) -> list[Output]:
        """The shell finished streaming ``reply`` (to its end, or hushed): the usage so far,
        and the session's end if a fault says this was the last reply."""
        if self.speaking is reply:
            self.speaking = None
        if reply.hushed:
            self._said_until = min(self._said_until, reply.end_ms)
        self.replies += 1
        out: list[Output] = [self._usage()]
        close = self.faults.live_close
        if close is None or close[1] != self.replies or self.closed:
            return out
        self.closed = True
        if close[0] == "abort":
            return [*out, Hangup(1006, "connection lost", abort=True)]
        code = 1011 if close[0] == "connection_lost" else 1000
        return [*out, self._closed(close[0]), Hangup(code, f"session {close[0]}")]

    # -- helpers -----------------------------------------------------------------------------
    def _error(self, message: str, code: str | None, param: str | None = None,
               client_id: str | None = None) -> Json:
        error: Json = {"type": "invalid_request_error", "code": code or "invalid_value",
                       "message": message}
        if param:
            error["param"] = param
        if client_id:
            error["client_event_id"] = client_id
        return self.event("error", error=error)

    def _usage(self) -> Json:
        return self.event("session.usage.updated", usage={"seconds": self.timeline_ms // 1000})

    def _closed(self, reason: str) -> Json:
        return self.event("session.closed", reason=reason, session=self.session,
                          usage={"seconds": self.timeline_ms // 1000})

    def _said(self, role: str, delta: str, start_ms: int, end_ms: int) -> Json:
        return self.event(f"session.{role}_transcript.delta", delta=delta, start_ms=start_ms,
                          end_ms=end_ms)

    def _speak(self, seed: bytes, say: str | None = None) -> Speak:
        """The robot says ``say`` (None: beeps) as soon as what it is saying now ends."""
        at = self.timeline_ms
        reply = LiveReply(self.event, at_ms=at, seed=seed, seconds=self.reply_seconds, say=say)
        self._said_until = at + round(self.reply_seconds * 1000)
        self.speaking = reply
        return Speak(reply)

    def _answer(self, end_ms: int, audio: bytes) -> list[Output]:
        """The person's turn ended at ``end_ms``: beeps, or the script's call."""
        self.turns += 1
        seed = hashlib.sha256(audio).digest()[:16]
        turn = self.script.turn(self.turns)
        if turn.call is None:
            return [self._speak(seed, turn.say)]
        did = self.event.new_id("del")
        delegation: Json = {"id": did, "type": "delegation"}
        out: list[Output] = []
        if self.delegation["type"] == "responses":
            rid, call_id = self.event.new_id("resp"), self.event.new_id("call")
            delegation |= {"target": "responses", "response_id": rid}
            self._calls[call_id] = turn.call
            item = {"type": "function_call", "id": self.event.new_id("fc"), "call_id": call_id,
                    "name": turn.call, "arguments": turn.arguments, "status": "completed"}
            out += [self._backend(did, "response.created", response=self._response(rid)),
                    self._backend(did, "response.output_item.done", output_index=0, item=item),
                    self._backend(did, "response.completed",
                                  response=self._response(rid, "completed", turn.arguments))]
        else:
            delegation["target"] = "client"
            self._waiting = did
        out.insert(0, self.event("session.delegation.created", delegation=delegation,
                                 offset_ms=end_ms))
        if turn.say is not None:  # the acknowledgement while the work runs
            out.append(self._speak(seed, turn.say))
        return out

    def _backend(self, delegation_id: str, kind: str, **body: Any) -> Json:
        """A ``response.event`` carrying one event of the delegated model's stream."""
        self._sequence += 1
        inner = {"type": kind, "sequence_number": self._sequence, **body}
        return self.event("response.event", delegation_id=delegation_id, event=inner)

    def _response(self, rid: str, status: str = "in_progress", text: str = "") -> Json:
        body: Json = {"id": rid, "object": "response", "created_at": int(self.clock()),
                      "model": self.delegation.get("responses", {}).get("model", "local"),
                      "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
                      "tools": [], "status": status}
        if status != "in_progress":
            spent = (40 + self.turns * 10, 5 + len(text) // 4)
            body["usage"] = {"input_tokens": spent[0], "output_tokens": spent[1],
                             "total_tokens": sum(spent),
                             "input_tokens_details": {"cached_tokens": 0,
                                                      "cache_write_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}}
        return body

    def _appended(self, kind: str, event: Json) -> list[Output]:
        content, did = event.get("content"), event.get("delegation_id", ...)
        require(isinstance(content, str), "Invalid type for 'content': expected a string.",
                "content")
        require(did is not ..., "Missing required parameter: 'delegation_id'.",
                "delegation_id", "missing_required_parameter")
        require(did is None or self.delegation["type"] == "client", "Non-null delegation IDs "
                "are not accepted with Responses delegation.", "delegation_id")
        require(did is None or did == self._waiting,
                f"Unknown delegation_id: {did!r}.", "delegation_id")
        at = self.timeline_ms
        body = {"start_ms": at, "end_ms": at, **({"client_event_id": event["event_id"]}
                                                 if isinstance(event.get("event_id"), str)
                                                 else {})}
        out: list[Output] = [self.event(f"session.{kind}.appended", **body)]
        if kind == "commentary":
            self._waiting = None if did is not None else self._waiting
            out.append(self._speak(content.encode(), f"*beep* ({' '.join(content.split())})"))
        return out

    # -- client event handlers ---------------------------------------------------------------
    def _on_start(self, event: Json) -> list[Output]:
        require(self.session is None, "The session has already started.", "type",
                "session_already_started")
        if self.faults.live_error is not None:
            code = self.faults.live_error
            message = ("Your credit balance is exhausted." if code == "credit_balance_exhausted"
                       else f"The model `{(event.get('session') or {}).get('model')}` does "
                       "not exist or you do not have access to it.")
            self.closed = True
            return [self._error(message, code, None, event.get("event_id")),
                    Hangup(1008, code)]
        self.session = start_session(event, session_id=self.id, expires_at=self.expires_at,
                                     rejected=self.faults.live_reject)
        started = self.event("session.started", session=self.session)
        if isinstance(event.get("event_id"), str):
            started["client_event_id"] = event["event_id"]
        return [started]

    def _on_append(self, event: Json) -> list[Output]:
        out: list[Output] = []
        for turn in self.input.append(decode_pcm(event.get("audio"), "audio")):
            if isinstance(turn, TurnStarted):
                self._turn_start = self._heard_to = turn.audio_start_ms
                out.append(self._said("input", "(speech", turn.audio_start_ms,
                                      turn.audio_start_ms))
                reply = self.speaking
                if reply is not None and not reply.hushed and reply.spans(turn.audio_start_ms):
                    reply.hushed = True
                    out.append(Hush(reply))
                continue
            out.append(self._said("input", f", {turn.speech_ms / 1000:.1f} s)",
                                  self._turn_start, turn.audio_end_ms))
            out += self._answer(turn.audio_end_ms, turn.audio)
        now = ms(self.input.position)
        if self.input.in_turn and now - self._heard_to >= HEARING_MS:
            out.append(self._said("input", "", self._heard_to, now))
            self._heard_to = now
        if now >= self._next_usage:
            self._next_usage += USAGE_EVERY_MS
            out.append(self._usage())
        return out

    def _on_thinking(self, event: Json) -> list[Output]:
        return self._appended("thinking", event)

    def _on_commentary(self, event: Json) -> list[Output]:
        return self._appended("commentary", event)

    def _on_item_create(self, event: Json) -> list[Output]:
        require(self.delegation["type"] == "responses",
                "response.item.create requires Responses delegation.", "type")
        item = event.get("item")
        require(isinstance(item, dict) and item.get("type") == "function_call_output",
                "The local backend accepts only function_call_output items.", "item.type")
        assert isinstance(item, dict)
        call_id, output = item.get("call_id"), item.get("output")
        require(call_id in self._calls, f"No tool call found for function call output with "
                f"call_id {call_id}.", "item.call_id")
        require(isinstance(output, str), "Invalid type for 'item.output': expected a string.",
                "item.output")
        self._outputs.append((self._calls.pop(call_id), output))
        return []

    def _on_response_create(self, event: Json) -> list[Output]:
        require(self.delegation["type"] == "responses",
                "response.create requires Responses delegation.", "type")
        require(bool(self._outputs) and not self._calls, "No delegated response is waiting "
                "for tool results.", None, "no_pending_response")
        said, self._outputs = quote_outputs(self._outputs), []
        did, rid = self.event.new_id("del"), self.event.new_id("resp")
        item = {"type": "message", "id": self.event.new_id("msg"), "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": said, "annotations": []}]}
        return [self._backend(did, "response.created", response=self._response(rid)),
                self._backend(did, "response.output_item.done", output_index=0, item=item),
                self._backend(did, "response.completed",
                              response=self._response(rid, "completed", said)),
                self._speak(said.encode(), said)]

    def _on_close(self, event: Json) -> list[Output]:
        self.closed = True
        closed = self._closed("close_requested")
        if isinstance(event.get("event_id"), str):
            closed["client_event_id"] = event["event_id"]
        return [closed, Hangup(1000, "session closed")]

    _handlers: ClassVar[dict[str, Handler]] = {
        "session.start": _on_start,
        "session.input_audio.append": _on_append,
        "session.thinking.append": _on_thinking,
        "session.commentary.append": _on_commentary,
        "response.item.create": _on_item_create,
        "response.create": _on_response_create,
        "session.close": _on_close,
    }
