"""The protocol logic of one local-backend connection, sans-IO.

:meth:`LocalSession.receive` takes one client message (a websocket frame) and returns what
to do, in order: server events (dicts) to send, :class:`~r2d2voice.localbackend.reply.Reply`
objects to stream, :class:`CancelReply` instructions. No sockets, no trio, no clocks of its
own: the wall clock (for ``expires_at``) and the id factory are injected, so a test can feed
JSON and read back exactly the events a client would get.

The parts: :mod:`.session_config` (``session.update``), :mod:`.turns` (input buffer and VAD
turns), :mod:`.items` (the conversation), :mod:`.reply` (one response), :mod:`.mcp` (remote
MCP servers: the service lists their tools when they are offered, and goes on by itself after
the client answers its approval request — once the reply in progress is done).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from r2d2voice.localbackend import session_config as sc
from r2d2voice.localbackend.context import ContextWindow
from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.items import (
    Conversation,
    Item,
    parse_item,
    system_item,
    user_audio_item,
)
from r2d2voice.localbackend.planner import Planner, ReplyPlan
from r2d2voice.localbackend.remote import approval_request, list_new_servers
from r2d2voice.localbackend.reply import Reply
from r2d2voice.localbackend.script import Script
from r2d2voice.localbackend.transcription import Deferred, commit_events
from r2d2voice.localbackend.turns import InputAudio, TurnStarted
from r2d2voice.localbackend.wire import (
    RATE,
    ClientError,
    EventMaker,
    IdFactory,
    Json,
    decode_pcm,
    ms,
    random_id,
    require,
)

__all__ = ["MIN_COMMIT_MS", "SESSION_LIFETIME_S", "CancelReply", "Later", "LocalSession",
           "Output"]

MIN_COMMIT_MS = 100
"""A manual commit needs at least this much audio, like the service."""

SESSION_LIFETIME_S = 3600
"""``expires_at`` is this long after the session is created."""


@dataclass(frozen=True)
class CancelReply:
    """For the shell: stop streaming ``reply`` now, then send its :meth:`Reply.closing`."""

    reply: Reply


@dataclass(frozen=True)
class Later:
    """For the shell: send ``events`` ``delay_s`` seconds from now (a late transcription)."""

    delay_s: float
    events: list[Json] = field(default_factory=list)


Output = Json | Reply | CancelReply | Later
Handler = Callable[["LocalSession", Json], list[Output]]


class LocalSession:
    """Protocol state of one connection: session config, input audio, items, the active reply.

    ``clock`` is wall time in seconds (only ``expires_at`` reads it); ``new_id`` makes every id
    (``sess``, ``conv``, ``item``, ``resp``, ``call``, ``event``); ``reply_seconds`` is the
    length of every reply; ``faults`` the habits to imitate; ``script`` what each turn says or
    calls; ``observer`` sees (session id, client event) for every JSON event received.
    ``model`` is the one the client asked for; the session names ``local`` (it identifies
    itself, see :data:`~r2d2voice.localbackend.session_config.LOCAL_MODEL`).
    """

    def __init__(
        self,
        model: str = sc.DEFAULT_MODEL,
        *,
        clock: Callable[[], float],
        new_id: IdFactory = random_id,
        reply_seconds: float = 1.0,
        faults: Faults | None = None,
        script: Script | None = None,
        observer: Callable[[str, Json], None] | None = None,
    ) -> None:
        self.event = EventMaker(new_id)
        self.reply_seconds = reply_seconds
        self.faults = faults or Faults()
        self.planner = Planner(script)
        self.commits = 0  # user turns committed; script turn N's ``hear`` is the Nth one's words
        self.observer = observer
        minutes = self.faults.session_minutes
        lifetime = round(minutes * 60) if minutes is not None else SESSION_LIFETIME_S
        self.requested_model = model  # the session names LOCAL_MODEL whatever was asked
        self.session = sc.default_session(new_id("sess"), int(clock()) + lifetime)
        self.conversation_id = new_id("conv")
        self.conversation = Conversation()
        self.window = ContextWindow()  # what responses read: truncation, cached prefix
        self.input = InputAudio(sc.vad_params(self.turn_detection), self.faults.benign_errors)
        self.active: Reply | None = None  # the reply in progress (not cancelled, not done)
        self.next: Reply | None = None  # the reply queued after it (the service goes on)
        self.responses = 0  # replies started
        self.idle_epoch = 0  # bumped whenever the idle timeout starts over
        self._idle_from_ms = 0  # where in the input stream the idle time started
        self._speech_item_id: str | None = None  # the user item the turn in progress becomes
        self._deferred: list[Deferred] = []  # transcriptions waiting for the next reply

    # -- public ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.session["id"]

    @property
    def turn_detection(self) -> Json | None:
        return self.session["audio"]["input"]["turn_detection"]

    @property
    def idle_timeout_s(self) -> float | None:
        """How long without speech until :meth:`on_idle` is due (None: not armed now): only
        with ``idle_timeout_ms`` on server_vad, no reply active and no turn in progress."""
        td = self.turn_detection
        if td is None or td.get("type") != "server_vad" or not td.get("idle_timeout_ms"):
            return None
        if self.active is not None or self.input.in_turn:
            return None
        return td["idle_timeout_ms"] / 1000

    def created(self) -> Json:
        """The first event of every connection."""
        return self.event("session.created", session=copy.deepcopy(self.session))

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
        if self.observer is not None:
            self.observer(self.id, event)
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        type_ = event.get("type")
        handler = self._handlers.get(type_) if isinstance(type_, str) else None
        if handler is None:
            supported = ", ".join(f"'{t}'" for t in self._handlers)
            return [self._error(f"Invalid value: {type_!r}. Supported values are: {supported}.",
                                "invalid_value", param="type", event_id=event_id)]
        try:
            return handler(self, event)
        except ClientError as exc:
            return [self._error(exc.message, exc.code, param=exc.param, event_id=event_id)]

    def finish_reply(self, reply: Reply) -> None:
        """The shell is done streaming ``reply`` (completed or cancelled)."""
        if self.active is reply:
            self.active, self.next = self.next, None
            self._idle_restart()

    def on_idle(self) -> list[Output]:
        """The idle timeout passed without speech (the shell's timer): like the service,
        ``timeout_triggered``, a system item, an empty user item committed, and a reply."""
        td = self.turn_detection or {}
        ev = self.event
        user_id = ev.new_id("item")
        end_ms = ms(self.input.position)
        out: list[Output] = [ev("input_audio_buffer.timeout_triggered",
                                audio_start_ms=self._idle_from_ms, audio_end_ms=end_ms,
                                item_id=user_id)]
        note = system_item(ev.new_id("item"),
                           f"The user has not spoken for {td.get('idle_timeout_ms')} ms.")
        previous = self.conversation.insert(note)
        out += [ev(kind, previous_item_id=previous, item=self.conversation.wire(note))
                for kind in ("conversation.item.added", "conversation.item.done")]
        self.input.take()
        out += self._commit(b"", 0, user_id)
        self._idle_restart()
        if self.active is None:
            out.append(self._start_reply())
        return out

    # -- helpers -----------------------------------------------------------------------

    def _error(self, message: str, code: str | None, *, param: str | None = None,
               event_id: str | None = None) -> Json:
        return self.event("error", error={
            "type": "invalid_request_error", "code": code, "message": message, "param": param,
            "event_id": event_id,
        })

    def _idle_restart(self) -> None:
        self.idle_epoch += 1
        self._idle_from_ms = ms(self.input.position)

    def _restart_turn_detection(self) -> None:
        self.input.detect(sc.vad_params(self.turn_detection))
        self._speech_item_id = None
        self._idle_restart()

    def _commit(self, audio: bytes, speech_ms: int, item_id: str | None) -> list[Output]:
        """Turn ``audio`` into a user item: committed, item added/done, transcription."""
        item = user_audio_item(item_id or self.event.new_id("item"), audio)
        previous = self.conversation.insert(item)
        transcribe = self.session["audio"]["input"]["transcription"] is not None
        self.commits += 1
        now, later = commit_events(self.event, self.conversation, item, previous, speech_ms,
                                   transcribe, self.faults,
                                   self.planner.script.turn(self.commits).hear)
        out: list[Output] = list(now)
        if later is not None and isinstance(later.when, str):
            self._deferred.append(later)
        elif later is not None:
            out.append(Later(float(later.when), later.events))
        return out

    def _start_reply(self, metadata: Any = None) -> Reply:
        reply = self._reply(self.planner.next(self.conversation, self.session), metadata)
        self.active = reply
        self.idle_epoch += 1
        return reply

    def _go_on(self, approval: Item, request: Item) -> list[Output]:
        """The service goes on by itself after the answer to its approval request: at once,
        or after the reply in progress (one reply queued at a time)."""
        if self.next is not None:
            return []
        reply = self._reply(Planner.approved(approval, request))
        if self.active is None:
            self.active, self.idle_epoch = reply, self.idle_epoch + 1
        else:
            self.next = reply
        return [reply]

    def _reply(self, plan: ReplyPlan, metadata: Any = None) -> Reply:
        self.responses += 1
        faults = self.faults
        reply = Reply(
            self.event, self.conversation, conversation_id=self.conversation_id,
            voice=self.session["audio"]["output"]["voice"],
            instructions=self.session.get("instructions") or "",
            seed=self.conversation.seed(), seconds=self.reply_seconds, metadata=metadata,
            plan=plan, fault=faults.response_fault(self.responses),
            extra=faults.extra_fields, rate_limits=faults.rate_limits,
            bill=self.window.biller(self.conversation.items, self.session),
        )
        for deferred in self._deferred:
            target = reply.on_start if deferred.when == "after_reply_start" else reply.on_done
            target += deferred.events
        self._deferred.clear()
        return reply

    def _cancel_active(self, reason: str) -> list[Output]:
        # a reply queued behind it is the one in progress now (the shell streams it next)
        reply, self.active, self.next = self.active, self.next, None
        if reply is None:
            return []
        reply.cancel(reason)
        return [CancelReply(reply)]

    # -- client event handlers ---------------------------------------------------------

    def _on_session_update(self, event: Json) -> list[Output]:
        before = self.session
        self.session, vad_changed = sc.apply_update(self.session, event.get("session"))
        if vad_changed:
            self._restart_turn_detection()
        return [self.event("session.updated", session=copy.deepcopy(self.session)),
                *list_new_servers(self.event, self.conversation, before, self.session,
                                  self.planner.script)]

    def _on_append(self, event: Json) -> list[Output]:
        raw = decode_pcm(event.get("audio"), "audio")
        if not raw:
            return []
        td = self.turn_detection or {}
        out: list[Output] = []
        for turn in self.input.append(raw):
            if isinstance(turn, TurnStarted):
                self._speech_item_id = self.event.new_id("item")
                out.append(self.event("input_audio_buffer.speech_started",
                                      audio_start_ms=turn.audio_start_ms,
                                      item_id=self._speech_item_id))
                if td.get("interrupt_response", True):
                    out += self._cancel_active("turn_detected")
                self.idle_epoch += 1
                continue
            item_id, self._speech_item_id = self._speech_item_id, None
            assert item_id is not None
            out.append(self.event("input_audio_buffer.speech_stopped",
                                  audio_end_ms=turn.audio_end_ms, item_id=item_id))
            out += self._commit(turn.audio, turn.speech_ms, item_id)
            self._idle_restart()
            if td.get("create_response", True) and self.active is None:
                out.append(self._start_reply())
        return out

    def _on_commit(self, event: Json) -> list[Output]:
        samples = self.input.samples
        require(
            ms(samples) >= MIN_COMMIT_MS,
            f"Error committing input audio buffer: buffer too small. Expected at least "
            f"{MIN_COMMIT_MS}ms of audio, but buffer only has {samples * 1000 / RATE:.2f}ms "
            f"of audio.", None, "input_audio_buffer_commit_empty",
        )
        item_id, self._speech_item_id = self._speech_item_id, None
        audio = self.input.take()  # a manual commit ends any turn in progress
        self._idle_restart()
        return self._commit(audio, ms(samples), item_id)

    def _on_clear(self, event: Json) -> list[Output]:
        self.input.take()
        self._speech_item_id = None
        self._idle_restart()
        return [self.event("input_audio_buffer.cleared")]

    def _on_item_create(self, event: Json) -> list[Output]:
        item = parse_item(event.get("item"), self.event.new_id)
        require(self.conversation.get(item.id) is None, f"Item with id {item.id} already exists.",
                "item.id", "item_create_duplicate_id")
        if item.role == "function_call_output":
            require(self.conversation.call(item.call_id or "") is not None,
                    f"No tool call found for function call output with call_id {item.call_id}.",
                    "item.call_id")
        request = approval_request(self.conversation, item)
        previous_item_id = event.get("previous_item_id")
        require(previous_item_id is None or isinstance(previous_item_id, str),
                "Invalid type for 'previous_item_id': expected a string.", "previous_item_id")
        previous = self.conversation.insert(item, previous_item_id)
        out: list[Output] = [
            self.event(kind, previous_item_id=previous, item=self.conversation.wire(item))
            for kind in ("conversation.item.added", "conversation.item.done")
        ]
        if request is not None:
            out += self._go_on(item, request)
        return out

    def _on_item_retrieve(self, event: Json) -> list[Output]:
        item = self.conversation.find(event.get("item_id"), "item_retrieve_invalid_item_id")
        return [self.event("conversation.item.retrieved", item=self.conversation.wire(item))]

    def _on_item_truncate(self, event: Json) -> list[Output]:
        item = self.conversation.find(event.get("item_id"), "item_truncate_invalid_item_id")
        end = event.get("audio_end_ms")
        self.conversation.truncate(item, event.get("content_index", 0), end)
        return [self.event("conversation.item.truncated", item_id=item.id, content_index=0,
                           audio_end_ms=end)]

    def _on_item_delete(self, event: Json) -> list[Output]:
        item = self.conversation.find(event.get("item_id"), "item_delete_invalid_item_id")
        self.conversation.remove(item)
        return [self.event("conversation.item.deleted", item_id=item.id)]

    def _on_response_create(self, event: Json) -> list[Output]:
        params = event.get("response")
        require(params is None or isinstance(params, dict),
                "Invalid type for 'response': expected an object.", "response")
        params = params or {}
        if "output_modalities" in params:
            sc.check_output_modalities(params["output_modalities"], "response.output_modalities")
        active = self.active
        require(active is None,
                "Conversation already has an active response in progress: "
                f"{active.id if active else ''}. Wait until the response is finished "
                "before creating a new one.", None, "conversation_already_has_active_response")
        return [self._start_reply(params.get("metadata"))]

    def _on_response_cancel(self, event: Json) -> list[Output]:
        active = self.active
        require(active is not None and event.get("response_id") in (None, active.id),
                "Cancellation failed: no active response found.", None,
                "response_cancel_not_active")
        return self._cancel_active("client_cancelled")

    def _on_output_clear(self, event: Json) -> list[Output]:
        raise ClientError("output_audio_buffer.clear is only supported for WebRTC and SIP.",
                          code="unsupported", param="type")

    _handlers: ClassVar[dict[str, Handler]] = {
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
