"""One Realtime session, both directions, as a state machine (after h11 and wsproto).

Inbound, :meth:`Conversation.receive` takes a parsed server event and answers with actions;
outbound, :meth:`Conversation.send` turns a client event record into JSON with an event id of
this instance. Times (``now``) are seconds of a monotonic clock the shell supplies; the core
never reads a clock, so every latency is a difference of two such times.

The service's habits are handled here: late user transcripts keep their place (and can be given
up on), the idle-timeout nudge's empty user item is no utterance, audio of a reply the user
talked over is never played, benign errors are not errors, and function calls run only from a
completed response (:mod:`.tool_calls`); the service's own calls of remote MCP servers are
audited and its approval requests decided like function calls (:mod:`.remote_mcp`).
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from r2d2voice.protocol.actions import (
    Action,
    AudioDone,
    BargeIn,
    Notice,
    Play,
    Send,
    StoreError,
    StoreInterrupted,
    StoreMessage,
    StoreResponse,
    StoreSession,
    UserSpeaking,
    UserStopped,
)
from r2d2voice.protocol.core import End, EndReason, LocalProtocolError
from r2d2voice.protocol.tool_records import StoreToolResult
from r2d2voice.realtime.client_events import (
    RATE,
    AudioAppend,
    ClientEvent,
    ItemCreateText,
    ItemDelete,
    ItemTruncate,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    ToolsUpdate,
    encode,
)
from r2d2voice.realtime.items import Items
from r2d2voice.realtime.latency import Latencies
from r2d2voice.realtime.server_events import (
    AudioDelta,
    CallArgumentsDelta,
    CallArgumentsDone,
    Ignored,
    InputCommitted,
    McpApprovalRequest,
    McpCall,
    McpEvent,
    McpListTools,
    McpListToolsFailed,
    OutputItemAdded,
    ProtocolError,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
    ServiceError,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TimeoutTriggered,
    TranscriptDelta,
    TranscriptDone,
    UserTranscript,
    UserTranscriptFailed,
    parse_event,
)
from r2d2voice.realtime.tool_calls import ToolCalls
from r2d2voice.realtime.tracking import MAX_TRACKED, remember


class Phase(enum.Enum):
    """The connection's life: events may be sent until it is CLOSED."""

    CONNECTING = "connecting"  # no session.created yet
    OPEN = "open"  # session.created
    CONFIGURED = "configured"  # session.updated: our session.update was applied
    CLOSED = "closed"  # the transport is gone (connection_lost)


class Turn(enum.Enum):
    """Who has the floor. IDLE is *settled*: nothing said is still to be answered or stored."""

    IDLE = "idle"
    USER_SPEAKING = "user_speaking"  # the service's VAD hears the user
    RESPONDING = "responding"  # a response is being generated (or we asked for one)
    ACTING = "acting"  # tools run; the model answers once their outputs are in
    TRANSCRIBING = "transcribing"  # replies are done; a user transcript is still to come


#: How each event type moves the turn. A state not listed for an event moves to the *rest*
#: state, what is still open: RESPONDING if a response is active or asked for, else ACTING if a
#: tool runs, else TRANSCRIBING if a user transcript is pending, else IDLE. Event types not in
#: the table leave the turn alone.
TRANSITIONS: dict[type, dict[Turn, Turn]] = {
    SpeechStarted: dict.fromkeys(Turn, Turn.USER_SPEAKING),
    SpeechStopped: {},
    InputCommitted: {},
    ResponseCreated: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    ResponseDone: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    UserTranscript: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    UserTranscriptFailed: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    ServiceError: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
}


#: close codes after which no retry can help (exit 3), and what they mean
FATAL_CLOSE_CODES = {
    3000: "the API key was refused",
    1013: "no quota left (check the plan and billing)",
    4000: "the request was refused (check the model name)",
}


class Conversation:
    """What one service session has said so far; answers every event with actions.

    ``interrupt_response``: the session lets speech cancel the reply in progress, so audio of
    that reply still arriving after the user started speaking is never played.
    """

    MAX_TRACKED_ITEMS = MAX_TRACKED

    #: the shell calls :meth:`tick` this often (None: never; everything here is event-driven)
    tick_interval: float | None = None

    def __init__(self, config: SessionConfig | None = None,
                 context: tuple[tuple[str, str], ...] = ()) -> None:
        self.config = config or SessionConfig(instructions="")
        #: turns of earlier sessions re-sent as text items after the configuration
        self.context = context
        self.interrupt_response = self.config.interrupt_response
        #: server messages that were not JSON events / ordinary races the service calls errors
        self.junk_messages = 0
        self.benign_errors = 0
        self.phase = Phase.CONNECTING
        self.turn = Turn.IDLE
        self.session_id: str | None = None
        self.model: str | None = None
        self.turns_committed = 0
        self.responses_done = 0
        self.active_response: str | None = None
        self.last_error: ServiceError | None = None
        #: how the session ended (set once: the first to notice decides)
        self.end: EndReason | None = None
        self.usage_totals: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        #: committed user items whose transcript is still to come -> their seq
        self.pending_user: OrderedDict[str, int] = OrderedDict()
        #: event id -> wire type of what this instance sent (to name it in service errors)
        self.sent: OrderedDict[str, str] = OrderedDict()
        self.tools = ToolCalls()
        self.latency = Latencies()
        #: audio deltas dropped because they belong to a reply the user talked over
        self.leftover_deltas = 0
        self.items = Items()
        self._event_ids = itertools.count(1)
        #: idle-timeout nudges: their empty user items are no utterances
        self._nudges: OrderedDict[str, bool] = OrderedDict()
        #: cancelled responses and stopped items: their late audio is never played
        self._cut: OrderedDict[str, bool] = OrderedDict()

    # -- queries ---------------------------------------------------------------------------
    @property
    def waiting_for_transcript(self) -> bool:
        """Everything is done but a user transcript that is still to come."""
        return self.turn is Turn.TRANSCRIBING

    def statistics(self) -> dict[str, int]:
        """This session's counts the shell adds to the run's (and the session row's)."""
        return {"junk_messages": self.junk_messages, "benign_errors": self.benign_errors,
                "leftover_deltas": self.leftover_deltas}

    def status(self, playing: bool) -> str:
        """What the robot is doing, for ``systemctl status`` (``playing``: audio is queued)."""
        if self.user_speaking:
            return "listening (you are speaking)"
        if self.active_response and not playing:
            return "thinking"
        if playing or self.active_response:
            return "speaking"
        if self.turn is Turn.ACTING:
            return "acting (" + ", ".join(self.tools.running) + ")"
        if self.turn is Turn.RESPONDING:
            return "thinking"
        return "listening"

    @property
    def idle(self) -> bool:
        """No user speech, no reply being generated or asked for, no tool running."""
        return self.turn in (Turn.IDLE, Turn.TRANSCRIBING)

    @property
    def settled(self) -> bool:
        """Idle, and every committed user turn has its transcript."""
        return self.turn is Turn.IDLE

    @property
    def user_speaking(self) -> bool:
        return self.turn is Turn.USER_SPEAKING

    @property
    def configured(self) -> bool:
        return self.phase is Phase.CONFIGURED

    @property
    def audio_ready(self) -> bool:
        """Audio may follow the ``session.update`` at once (the service applies it first)."""
        return self.phase is not Phase.CLOSED

    @property
    def awaiting_play(self) -> OrderedDict[str, tuple[str, float]]:
        """Reply item -> (response id, end of speech) until its first sample is played."""
        return self.latency.awaiting_play

    def received_samples(self, item_id: str) -> int:
        reply = self.items.known_reply(item_id)
        return reply.audio_samples if reply else 0

    def seq_of(self, item_id: str) -> int | None:
        return self.items.seq_of(item_id)

    # -- outbound --------------------------------------------------------------------------
    def opening(self) -> list[str]:
        """The session's configuration, then the context of earlier sessions."""
        return [self.send(SessionUpdate(self.config)),
                *(self.send(ItemCreateText(role, text)) for role, text in self.context)]

    def audio(self, pcm: bytes) -> str:
        return self.send(AudioAppend(pcm))

    def send(self, event: ClientEvent) -> str:
        """The wire JSON of ``event`` with this instance's next event id; remembers it."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: connection closed")
        event_id = f"evt_r2_{next(self._event_ids)}"
        remember(self.sent, event_id, event.TYPE)
        return encode(event, event_id)

    # -- inbound ---------------------------------------------------------------------------
    def receive(self, event: ServerEvent | str | bytes, now: float) -> list[Action]:
        """Apply one server message (or an event already parsed) received at ``now``; return
        what the shell should do. Junk (not a JSON event) and events we do not use are
        counted or skipped, never raised."""
        if isinstance(event, (str, bytes)):
            try:
                event = parse_event(event)
            except ProtocolError:
                self.junk_messages += 1
                return []
        if isinstance(event, Ignored):
            return []
        handler = self._HANDLERS.get(type(event))
        out = handler(self, event, now) if handler else []
        moves = TRANSITIONS.get(type(event))
        if moves is not None:
            self.turn = moves.get(self.turn) or self._rest()
        return out

    def first_played(self, item_id: str, at: float) -> list[Action]:
        """The first sample of reply ``item_id`` reached the speaker at ``at`` (same clock)."""
        return self.latency.first_played(item_id, at)

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker stopped reply ``item_id`` after ``played_samples`` at 24 kHz.

        Truncates the service's copy to what was heard (never more than was received), or
        deletes the item if nothing was heard, and marks the stored message interrupted; audio
        of it still arriving is dropped. An item this session never sent (audio of an earlier
        session) needs nothing.
        """
        reply = self.items.known_reply(item_id)
        if reply is None:
            return []
        remember(self._cut, item_id, True)
        played = max(0, min(played_samples, reply.audio_samples))
        played_ms = played * 1000 // RATE
        if played == 0:
            self.latency.never_played(item_id)
        event = ItemTruncate(item_id, played_ms) if played_ms > 0 else ItemDelete(item_id)
        return [Send(event), StoreInterrupted(item_id, reply.seq, played_ms)]

    def finish(self, reason: EndReason) -> list[str]:
        """The session ends for ``reason`` (ignored once an end is known); nothing to send
        first: closing the socket ends a Realtime session."""
        if self.end is None:
            self.end = reason
        return []

    def connection_lost(self, code: int | None = None, reason: str = "closed"
                        ) -> list[Action]:
        """The transport is gone (with close ``code``, if any): decide how the session ended,
        store transcripts that never got their ``.done``; no more sending. Calling it again
        returns nothing more."""
        out: list[Action] = []
        ours = self.end is not None and self.end.ours
        if code in FATAL_CLOSE_CODES and not ours and (
                self.end is None or self.end.kind is not End.FATAL):
            said = f": {self.last_error.message}" if self.last_error is not None else ""
            self.end = EndReason(End.FATAL, (
                f"the Realtime service closed the connection with code {code} "
                f"({FATAL_CLOSE_CODES[code]}){said}"))
            out.append(StoreError("connection_closed", str(code), self.end.detail, True))
        elif self.phase is not Phase.CLOSED and not ours and (
                self.end is None or self.end.kind in (End.LOST, End.EXPIRED)):
            self.finish(EndReason(End.LOST, reason))
            out.append(StoreError("connection_lost", None, self.end.detail, False))
        out += self.items.unfinished()
        out += self.tools.remote.unanswered()
        out += [AudioDone(item_id) for item_id in self.items.audio_over()]
        self.phase = Phase.CLOSED
        self.turn = Turn.IDLE
        self.active_response = None
        self.tools.stop()
        return out

    def tool_finished(self, result: StoreToolResult, *, hang_up: bool = False) -> list[Action]:
        """A tool the shell ran for :class:`CallTool` finished: record the result, send its
        output, and once every call of the asking response is answered ask for a reply (when
        no other response is active). ``hang_up``: it was ``end_conversation``, so that reply
        is the goodbye, after which :class:`HangUp` comes."""
        sent = self.tools.answered(result, hang_up=hang_up, send=self.phase is not Phase.CLOSED)
        # an approved MCP request's row waits for the result of the call the service makes
        out: list[Action] = [] if self.tools.remote.waits_for_call(result.call_id) else [result]
        out += sent
        out += self._request_response()
        self._settle()
        return out

    def tool_says(self, text: str) -> list[Action]:
        """A running call has the model told ``text`` (a system item; a call waiting for the
        person's yes has it ask) and a reply asked for once no response is active."""
        if self.phase is Phase.CLOSED:
            return []
        self.tools.due = True
        out: list[Action] = [Send(ItemCreateText("system", text)), *self._request_response()]
        self._settle()
        return out

    def tools_offered(self, tools: tuple[dict[str, Any], ...]) -> list[Action]:
        """The tools on offer changed: the session's are replaced (``session.update``)."""
        self.config = replace(self.config, tools=tuple(tools))
        return [] if self.phase is Phase.CLOSED else [Send(ToolsUpdate(tuple(tools)))]

    def give_up_transcripts(self) -> list[str]:
        """Stop waiting for user transcripts that never came; returns their item ids. One that
        comes later anyway is stored in its place as usual."""
        items = list(self.pending_user)
        self.pending_user.clear()
        self._settle()
        return items

    # -- handlers --------------------------------------------------------------------------
    def _on_session_created(self, ev: SessionCreated, now: float) -> list[Action]:
        self.session_id, self.model = ev.session_id, ev.model
        self.phase = Phase.OPEN
        return [StoreSession(ev.session_id, ev.model)]

    def _on_session_updated(self, ev: SessionUpdated, now: float) -> list[Action]:
        self.phase = Phase.CONFIGURED
        return []

    def _on_speech_started(self, ev: SpeechStarted, now: float) -> list[Action]:
        if self.active_response is not None and self.interrupt_response:
            remember(self._cut, self.active_response, True)  # the service cancels it
        return [UserSpeaking(ev.item_id), BargeIn(ev.item_id)]

    def _on_speech_stopped(self, ev: SpeechStopped, now: float) -> list[Action]:
        self.latency.speech_stopped(now)
        return [UserStopped(ev.item_id)]

    def _on_timeout(self, ev: TimeoutTriggered, now: float) -> list[Action]:
        remember(self._nudges, ev.item_id, True)
        self.latency.no_speech()
        return []

    def _on_committed(self, ev: InputCommitted, now: float) -> list[Action]:
        if ev.item_id in self._nudges:
            return []
        self.turns_committed += 1
        remember(self.pending_user, ev.item_id, self.items.seq(ev.item_id))
        return []

    def _on_user_transcript(self, ev: UserTranscript, now: float) -> list[Action]:
        self.pending_user.pop(ev.item_id, None)
        if ev.item_id in self._nudges:
            return []
        return [StoreMessage("user", ev.item_id, self.items.seq(ev.item_id), ev.transcript,
                             raw=ev.raw)]

    def _on_transcript_failed(self, ev: UserTranscriptFailed, now: float) -> list[Action]:
        self.pending_user.pop(ev.item_id, None)
        if ev.item_id in self._nudges:
            return []
        return [StoreError("transcription_failed", None, f"{ev.item_id}: {ev.message}", False)]

    def _on_response_created(self, ev: ResponseCreated, now: float) -> list[Action]:
        self.tools.response_created(ev.response_id)
        self.active_response = ev.response_id
        self.latency.response_created(ev.response_id, now)
        return [StoreResponse(ev.response_id, "in_progress")]

    def _on_output_item(self, ev: OutputItemAdded, now: float) -> list[Action]:
        if ev.kind == "function_call":
            self.tools.added(ev.response_id, ev.item_id, ev.call_id or ev.item_id,
                             ev.name or "?", self.items.seq(ev.item_id))
        elif ev.kind == "message":
            self.items.reply(ev.item_id, ev.response_id)
        else:  # an MCP item, …: its place is where it starts
            self.items.seq(ev.item_id)
        return []

    def _on_mcp(self, ev: McpEvent, now: float) -> list[Action]:
        return self.tools.mcp(ev, self.items.seq, self.active_response)

    def _on_call_delta(self, ev: CallArgumentsDelta, now: float) -> list[Action]:
        self.tools.delta(ev)
        return []

    def _on_call_done(self, ev: CallArgumentsDone, now: float) -> list[Action]:
        return self.tools.arguments_done(ev, self.items.seq(ev.item_id))

    def _on_audio(self, ev: AudioDelta, now: float) -> list[Action]:
        if ev.response_id in self._cut or ev.item_id in self._cut:
            self.leftover_deltas += 1
            return []
        reply = self.items.reply(ev.item_id, ev.response_id)
        reply.audio_samples += len(ev.pcm) // 2
        self.latency.audio(ev.response_id, ev.item_id, now)
        return [Play(ev.item_id, ev.pcm)] if ev.pcm else []

    def _on_transcript_delta(self, ev: TranscriptDelta, now: float) -> list[Action]:
        self.items.reply(ev.item_id, ev.response_id).text.append(ev.delta)
        return []

    def _on_transcript_done(self, ev: TranscriptDone, now: float) -> list[Action]:
        reply = self.items.reply(ev.item_id, ev.response_id)
        reply.text = [ev.transcript]
        reply.done = True
        return [StoreMessage("assistant", ev.item_id, reply.seq, ev.transcript, ev.response_id,
                             raw=ev.raw)]

    def _on_response_done(self, ev: ResponseDone, now: float) -> list[Action]:
        if self.active_response == ev.response_id:
            self.active_response = None
        self.responses_done += 1
        for key in ("input_tokens", "output_tokens"):
            v = (ev.usage or {}).get(key)
            if isinstance(v, int):
                self.usage_totals[key] += v
        out: list[Action] = [StoreResponse(ev.response_id, ev.status, ev.usage,
                                           ev.status_details,
                                           self.latency.response_done(ev.response_id))]
        out += self.items.unfinished(ev.response_id)  # a reply cut off: keep what was said
        out += [AudioDone(item_id) for item_id in self.items.audio_over(ev.response_id)]
        out += self.tools.response_done(ev.response_id, ev.status, ev.status_details)
        return out + self._request_response()

    def tick(self, now: float) -> list[Action]:
        return []

    def _on_error(self, ev: ServiceError, now: float) -> list[Action]:
        if ev.benign:  # an ordinary race: the shell logs it, nothing is stored
            self.benign_errors += 1
            ours = self.sent.get(ev.event_id or "") == ResponseCreate.TYPE
            if ev.code == "conversation_already_has_active_response" and ours:
                self.tools.busy()
            return [Notice(f"service: {ev.message} ({ev.code}), going on")]
        self.last_error = ev
        if ev.fatal:
            self.finish(EndReason(End.FATAL, f"the Realtime service refused: {ev.message}"
                                  + (f" ({ev.code})" if ev.code else "")))
        elif ev.ends_session:
            self.finish(EndReason(End.EXPIRED, f"session ended by the service ({ev.code})"))
        message = ev.message
        if ev.event_id in self.sent:
            message += f" (in reply to our {self.sent[ev.event_id]})"
        return [StoreError(ev.type, ev.code, message, ev.fatal)]

    _HANDLERS: ClassVar[dict[type, Callable[[Conversation, Any, float], list[Action]]]] = {
        SessionCreated: _on_session_created,
        SessionUpdated: _on_session_updated,
        SpeechStarted: _on_speech_started,
        SpeechStopped: _on_speech_stopped,
        TimeoutTriggered: _on_timeout,
        InputCommitted: _on_committed,
        UserTranscript: _on_user_transcript,
        UserTranscriptFailed: _on_transcript_failed,
        ResponseCreated: _on_response_created,
        OutputItemAdded: _on_output_item,
        AudioDelta: _on_audio,
        TranscriptDelta: _on_transcript_delta,
        TranscriptDone: _on_transcript_done,
        CallArgumentsDelta: _on_call_delta,
        CallArgumentsDone: _on_call_done,
        ResponseDone: _on_response_done,
        ServiceError: _on_error,
        McpApprovalRequest: _on_mcp,
        McpCall: _on_mcp,
        McpListTools: _on_mcp,
        McpListToolsFailed: _on_mcp,
    }

    # -- helpers ---------------------------------------------------------------------------
    def _rest(self) -> Turn:
        if self.active_response is not None or self.tools.awaiting_reply:
            return Turn.RESPONDING
        if self.tools.running:
            return Turn.ACTING
        return Turn.TRANSCRIBING if self.pending_user else Turn.IDLE

    def _settle(self) -> None:
        """Recompute the turn after a change the shell made (not a server event)."""
        if self.turn is not Turn.USER_SPEAKING:
            self.turn = self._rest()

    def _request_response(self) -> list[Action]:
        """Ask for the reply tool outputs are due, unless the session is gone or the user is
        speaking (the response for their turn will answer the outputs)."""
        if self.phase is Phase.CLOSED or self.turn is Turn.USER_SPEAKING:
            return []
        return self.tools.request(self.active_response)

