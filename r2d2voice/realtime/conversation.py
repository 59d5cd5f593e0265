"""One Realtime session, both directions, as a state machine (after h11 and wsproto).

Inbound, :meth:`Conversation.receive` takes a parsed server event and answers with actions;
outbound, :meth:`Conversation.send` turns a client event record into JSON with an event id of
this instance. Times (``now``) are seconds of a monotonic clock the shell supplies; the core
never reads a clock, so every latency is a difference of two such times.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from r2d2voice.realtime.actions import (
    Action,
    BargeIn,
    Play,
    Send,
    StoreError,
    StoreInterrupted,
    StoreLatency,
    StoreMessage,
    StoreResponse,
    StoreSession,
)
from r2d2voice.realtime.client_events import (
    RATE,
    ClientEvent,
    ItemDelete,
    ItemTruncate,
    encode,
)
from r2d2voice.realtime.server_events import (
    AudioDelta,
    InputCommitted,
    OutputItemAdded,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
    ServiceError,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptDone,
    UserTranscript,
    UserTranscriptFailed,
)


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
    RESPONDING = "responding"  # a response is being generated
    TRANSCRIBING = "transcribing"  # replies are done; a user transcript is still to come


#: How each event type moves the turn. A state not listed for an event moves to the *rest*
#: state, what is still open: RESPONDING if a response is active, else TRANSCRIBING if a user
#: transcript is pending, else IDLE. Event types not in the table leave the turn alone.
TRANSITIONS: dict[type, dict[Turn, Turn]] = {
    SpeechStarted: dict.fromkeys(Turn, Turn.USER_SPEAKING),
    SpeechStopped: {},
    InputCommitted: {},
    ResponseCreated: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    ResponseDone: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    UserTranscript: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
    UserTranscriptFailed: {Turn.USER_SPEAKING: Turn.USER_SPEAKING},
}


class LocalProtocolError(RuntimeError):
    """The shell asked for something the state forbids (sending on a closed connection)."""


@dataclass
class _Reply:
    response_id: str | None
    seq: int
    text: list[str] = field(default_factory=list)
    audio_samples: int = 0
    done: bool = False


class Conversation:
    """What one service session has said so far; answers every event with actions."""

    MAX_TRACKED_ITEMS = 256

    def __init__(self) -> None:
        self.phase = Phase.CONNECTING
        self.turn = Turn.IDLE
        self.session_id: str | None = None
        self.model: str | None = None
        self.turns_committed = 0
        self.responses_done = 0
        self.active_response: str | None = None
        self.last_error: ServiceError | None = None
        self.usage_totals: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        #: committed user items whose transcript is still to come -> their seq
        self.pending_user: OrderedDict[str, int] = OrderedDict()
        #: reply item -> (response id, end of the user's speech) until its first sample plays
        self.awaiting_play: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: event id -> wire type of what this instance sent (to name it in service errors)
        self.sent: OrderedDict[str, str] = OrderedDict()
        self._event_ids = itertools.count(1)
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._last_seq = 0
        self._replies: OrderedDict[str, _Reply] = OrderedDict()
        self._response_created: OrderedDict[str, float] = OrderedDict()
        self._first_audio: OrderedDict[str, float] = OrderedDict()
        self._speech_stopped_at: float | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No user speech in progress and no reply being generated."""
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

    def received_samples(self, item_id: str) -> int:
        reply = self._replies.get(item_id)
        return reply.audio_samples if reply else 0

    def seq_of(self, item_id: str) -> int | None:
        return self._seqs.get(item_id)

    # -- outbound --------------------------------------------------------------------------
    def send(self, event: ClientEvent) -> str:
        """The wire JSON of ``event`` with this instance's next event id; remembers it."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: connection closed")
        event_id = f"evt_r2_{next(self._event_ids)}"
        self._remember(self.sent, event_id, event.TYPE)
        return encode(event, event_id)

    # -- inbound ---------------------------------------------------------------------------
    def receive(self, event: ServerEvent, now: float) -> list[Action]:
        """Apply one server event received at ``now``; return what the shell should do."""
        handler = self._HANDLERS.get(type(event))
        out = handler(self, event, now) if handler else []
        moves = TRANSITIONS.get(type(event))
        if moves is not None:
            self.turn = moves.get(self.turn) or self._rest()
        return out

    def first_played(self, item_id: str, at: float) -> list[Action]:
        """The first sample of reply ``item_id`` reached the speaker at ``at`` (same clock)."""
        pending = self.awaiting_play.pop(item_id, None)
        if pending is None:
            return []
        response_id, stopped = pending
        return [StoreLatency(response_id, round((at - stopped) * 1000, 1))]

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker stopped reply ``item_id`` after ``played_samples`` at 24 kHz.

        Truncates the service's copy to what was heard (never more than was received), or
        deletes the item if nothing was heard, and marks the stored message interrupted. An item
        this session never sent (audio of an earlier session) needs nothing.
        """
        reply = self._replies.get(item_id)
        if reply is None:
            return []
        played = max(0, min(played_samples, reply.audio_samples))
        played_ms = played * 1000 // RATE
        if played == 0:
            self.awaiting_play.pop(item_id, None)
        event = ItemTruncate(item_id, played_ms) if played_ms > 0 else ItemDelete(item_id)
        return [Send(event), StoreInterrupted(item_id, reply.seq, played_ms)]

    def connection_lost(self) -> list[Action]:
        """The transport is gone: store transcripts that never got their ``.done``; no more
        sending. Calling it again returns nothing."""
        out: list[Action] = []
        for item_id, reply in self._replies.items():
            if not reply.done and reply.text:
                out.append(self._partial(item_id, reply))
        self.phase = Phase.CLOSED
        self.turn = Turn.IDLE
        self.active_response = None
        return out

    # -- handlers --------------------------------------------------------------------------
    def _on_session_created(self, ev: SessionCreated, now: float) -> list[Action]:
        self.session_id, self.model = ev.session_id, ev.model
        self.phase = Phase.OPEN
        return [StoreSession(ev.session_id, ev.model)]

    def _on_session_updated(self, ev: SessionUpdated, now: float) -> list[Action]:
        self.phase = Phase.CONFIGURED
        return []

    def _on_speech_started(self, ev: SpeechStarted, now: float) -> list[Action]:
        return [BargeIn(ev.item_id)]

    def _on_speech_stopped(self, ev: SpeechStopped, now: float) -> list[Action]:
        self._speech_stopped_at = now
        return []

    def _on_committed(self, ev: InputCommitted, now: float) -> list[Action]:
        self.turns_committed += 1
        self._remember(self.pending_user, ev.item_id, self._seq(ev.item_id))
        return []

    def _on_user_transcript(self, ev: UserTranscript, now: float) -> list[Action]:
        self.pending_user.pop(ev.item_id, None)
        return [StoreMessage("user", ev.item_id, self._seq(ev.item_id), ev.transcript,
                             raw=ev.raw)]

    def _on_transcript_failed(self, ev: UserTranscriptFailed, now: float) -> list[Action]:
        self.pending_user.pop(ev.item_id, None)
        return [StoreError("transcription_failed", None, f"{ev.item_id}: {ev.message}", False)]

    def _on_response_created(self, ev: ResponseCreated, now: float) -> list[Action]:
        self.active_response = ev.response_id
        self._remember(self._response_created, ev.response_id, now)
        return [StoreResponse(ev.response_id, "in_progress")]

    def _on_output_item(self, ev: OutputItemAdded, now: float) -> list[Action]:
        self._reply(ev.item_id, ev.response_id)
        return []

    def _on_audio(self, ev: AudioDelta, now: float) -> list[Action]:
        reply = self._reply(ev.item_id, ev.response_id)
        reply.audio_samples += len(ev.pcm) // 2
        if ev.response_id not in self._first_audio:
            self._remember(self._first_audio, ev.response_id, now)
            stopped = self._answered_speech(ev.response_id)
            if stopped is not None:
                self._remember(self.awaiting_play, ev.item_id, (ev.response_id, stopped))
        return [Play(ev.item_id, ev.pcm)] if ev.pcm else []

    def _on_transcript_delta(self, ev: TranscriptDelta, now: float) -> list[Action]:
        self._reply(ev.item_id, ev.response_id).text.append(ev.delta)
        return []

    def _on_transcript_done(self, ev: TranscriptDone, now: float) -> list[Action]:
        reply = self._reply(ev.item_id, ev.response_id)
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
        first = self._first_audio.pop(ev.response_id, None)
        stopped = self._answered_speech(ev.response_id)
        self._response_created.pop(ev.response_id, None)
        latency = None
        if first is not None and stopped is not None:
            latency = round((first - stopped) * 1000, 1)
        out: list[Action] = [StoreResponse(ev.response_id, ev.status, ev.usage,
                                           ev.status_details, latency)]
        # a reply cut off before its transcript finished: keep what was said
        for item_id, reply in self._replies.items():
            if reply.response_id == ev.response_id and not reply.done and reply.text:
                out.append(self._partial(item_id, reply))
        return out

    def _on_error(self, ev: ServiceError, now: float) -> list[Action]:
        self.last_error = ev
        message = ev.message
        if ev.event_id in self.sent:
            message += f" (in reply to our {self.sent[ev.event_id]})"
        return [StoreError(ev.type, ev.code, message, ev.fatal)]

    _HANDLERS: ClassVar[dict[type, Callable[[Conversation, Any, float], list[Action]]]] = {
        SessionCreated: _on_session_created,
        SessionUpdated: _on_session_updated,
        SpeechStarted: _on_speech_started,
        SpeechStopped: _on_speech_stopped,
        InputCommitted: _on_committed,
        UserTranscript: _on_user_transcript,
        UserTranscriptFailed: _on_transcript_failed,
        ResponseCreated: _on_response_created,
        OutputItemAdded: _on_output_item,
        AudioDelta: _on_audio,
        TranscriptDelta: _on_transcript_delta,
        TranscriptDone: _on_transcript_done,
        ResponseDone: _on_response_done,
        ServiceError: _on_error,
    }

    # -- helpers ---------------------------------------------------------------------------
    def _rest(self) -> Turn:
        if self.active_response is not None:
            return Turn.RESPONDING
        return Turn.TRANSCRIBING if self.pending_user else Turn.IDLE

    def _seq(self, item_id: str) -> int:
        """The item's place in the conversation, given when it is first seen."""
        seq = self._seqs.get(item_id)
        if seq is None:
            self._last_seq += 1
            seq = self._last_seq
            self._remember(self._seqs, item_id, seq)
        return seq

    def _answered_speech(self, response_id: str) -> float | None:
        """When the user's speech this response answers stopped (None: not a speech turn)."""
        stopped = self._speech_stopped_at
        created = self._response_created.get(response_id)
        if stopped is None or created is None or stopped > created:
            return None
        return stopped

    def _reply(self, item_id: str, response_id: str | None) -> _Reply:
        reply = self._replies.get(item_id)
        if reply is None:
            reply = _Reply(response_id, self._seq(item_id))
            self._remember(self._replies, item_id, reply)
        elif reply.response_id is None:
            reply.response_id = response_id
        return reply

    def _partial(self, item_id: str, reply: _Reply) -> StoreMessage:
        reply.done = True
        return StoreMessage("assistant", item_id, reply.seq, "".join(reply.text),
                            reply.response_id, partial=True)

    def _remember(self, d: OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        d.move_to_end(key)
        while len(d) > self.MAX_TRACKED_ITEMS:
            d.popitem(last=False)
