"""One GPT-Live session, both directions, as a state machine (after h11 and wsproto).

:class:`LiveConversation` implements :class:`~r2d2voice.protocol.core.ProtocolCore`: the
link hands it every message and the transport's loss, calls :meth:`~LiveConversation.tick`
between messages, and carries out the actions it answers with (the same vocabulary as the
Realtime core). Times are seconds of the shell's monotonic clock; the timeline positions the
service sends are ms from the session's start.

- **Opening**: ``session.start`` first (:meth:`~LiveConversation.opening`); no audio before
  ``session.started``. There is no commit and no response to ask for: the model listens
  and speaks at once.
- **The record**: utterances from transcript deltas (:mod:`.utterances`).
- **Tools**: Responses delegation (:mod:`.delegation`); without tools there is no backend,
  and a delegation to the client is answered with a commentary saying so.
- **Usage**: ``session.usage.updated`` / ``session.closed`` carry the billed seconds so far,
  a total: each becomes a :class:`StoreUsage` that replaces the one before.
- **End**: ``session.closed`` reasons and fatal errors set :attr:`~LiveConversation.end`
  (see :data:`CLOSE_ENDS`); an error answering our ``session.start`` (a field refused) is a
  configuration error. ``expired`` means a new session at once, which the link seeds with
  the recent conversation as it does for Realtime (``LiveConfig.with_history``).
- **Closing**: our own end is ``session.close`` (:meth:`~LiveConversation.finish`), answered
  by ``session.closed`` with the final usage and what is still open committed.
"""

from __future__ import annotations

import enum
import itertools
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from r2d2voice.live.client_events import (
    AudioAppend,
    ClientEvent,
    CommentaryAppend,
    LiveConfig,
    SessionClose,
    SessionStart,
    ThinkingAppend,
    encode,
)
from r2d2voice.live.delegation import Delegations
from r2d2voice.live.server_events import (
    ASSISTANT,
    USER,
    AudioDelta,
    BackendCall,
    BackendResponse,
    DelegationCreated,
    ProtocolError,
    ServerEvent,
    ServiceError,
    SessionClosed,
    SessionStarted,
    TranscriptDelta,
    UsageUpdated,
    parse_event,
)
from r2d2voice.live.utterances import PAUSE_MS, Utterances
from r2d2voice.protocol.actions import (
    Action,
    BargeIn,
    HangUp,
    Play,
    Send,
    StoreError,
    StoreMessage,
    StoreSession,
    StoreUsage,
)
from r2d2voice.protocol.core import TICK_S, End, EndReason, LocalProtocolError
from r2d2voice.protocol.tool_records import StoreToolResult

#: How each ``session.closed`` reason ends the connection (the shell's own close comes first:
#: an end already set is kept). ``close_requested`` we did not ask for: another client closed
#: it; ``content``: the safety filter (reconnect with backoff, never in a tight loop).
CLOSE_ENDS: dict[str, End] = {
    "close_requested": End.HANGUP, "expired": End.EXPIRED, "content": End.LOST,
    "remote_hangup": End.HANGUP, "connection_lost": End.LOST,
}
#: What a client delegation is told when the appliance has no tools to do the work with.
NO_BACKEND = ("R2 has no tools for that here: tell the person briefly that R2 cannot do it, "
              "and go on with the conversation.")
#: Sent event ids remembered (to name our event in a service error); audio is never kept.
MAX_SENT = 64


class Phase(enum.Enum):
    """The connection's life: events may be sent until it is CLOSED."""

    CONNECTING = "connecting"  # session.start not answered yet
    STARTED = "started"  # session.started
    CLOSING = "closing"  # we sent session.close
    CLOSED = "closed"  # session.closed received, or the transport is gone


class LiveConversation:
    """What one GPT-Live session has said so far; answers every message with actions.

    ``pause_ms``: a speaker's silence this long ends their utterance."""

    #: pauses close utterances: the shell calls :meth:`tick` this often
    tick_interval: float | None = TICK_S

    def __init__(self, config: LiveConfig, *, pause_ms: int = PAUSE_MS) -> None:
        self.config = config
        self.phase = Phase.CONNECTING
        self.end: EndReason | None = None
        self.session_id: str | None = None
        self.model: str | None = None
        #: billed seconds so far, as the service last said (a total)
        self.usage_seconds: float | None = None
        self.last_error: ServiceError | None = None
        self.junk_messages = 0
        self.utterances = Utterances(pause_ms)
        self.tools = Delegations()
        #: event id -> wire type of what this instance sent (audio appends aside)
        self.sent: OrderedDict[str, str] = OrderedDict()
        self._event_ids = itertools.count(1)
        self._start_id: str | None = None
        self._started_at: float | None = None
        self._now = 0.0
        #: end_conversation ran: the robot's next utterance starting after this timeline ms
        #: is the goodbye
        self._goodbye: int | None = None

    # -- ProtocolCore: queries ---------------------------------------------------------------
    @property
    def configured(self) -> bool:
        """``session.started``: audio may flow."""
        return self.phase is Phase.STARTED

    @property
    def audio_ready(self) -> bool:
        """No audio before ``session.started`` (the service refuses it)."""
        return self.phase is Phase.STARTED

    @property
    def turns_committed(self) -> int:
        """Stretches of the person's speech the service heard (there are no turns: a stretch
        counts from its first fragment)."""
        return self.utterances.heard

    @property
    def responses_done(self) -> int:
        """Stretches of the robot's speech that ended (a pause on the clock, or closed)."""
        return self.utterances.replies_done

    @property
    def user_speaking(self) -> bool:
        """The person's words came within the pause."""
        return self.utterances.speaking(self._now, USER)

    @property
    def waiting_for_transcript(self) -> bool:
        """Never: transcripts come as fragments with the speech, none is waited for."""
        return False

    def give_up_transcripts(self) -> list[str]:
        return []

    def tool_says(self, text: str) -> list[Action]:
        """A running call has the model told ``text``: silent context (a call waiting for the
        person's yes has the model ask)."""
        return [] if self.end is not None else [Send(ThinkingAppend(text))]

    def tools_offered(self, tools: tuple[dict[str, Any], ...]) -> list[Action]:
        """Fixed once started: new tools are offered from the next session on."""
        return []

    def statistics(self) -> dict[str, int]:
        """This session's counts the shell adds to the run's (and the session row's)."""
        return {"junk_messages": self.junk_messages}

    def status(self, playing: bool) -> str:
        """What the robot is doing, for ``systemctl status`` (``playing``: audio is queued)."""
        if self.user_speaking:
            return "listening (you are speaking)"
        if self.tools.busy:
            return "acting"
        if playing or self.utterances.speaking(self._now, ASSISTANT):
            return "speaking"
        return "listening"

    @property
    def idle(self) -> bool:
        """Nobody spoke within the pause, and no delegated work or tool is under way."""
        return not self.utterances.speaking(self._now) and not self.tools.busy

    @property
    def settled(self) -> bool:
        """Idle: nothing is still to come. A stretch the timeline has not closed yet is
        committed whole by our close (``session.closed`` flushes it), so the link need not
        wait for the timeline to pass its pause."""
        return self.idle

    @property
    def awaiting_play(self) -> Mapping[str, object]:
        """Always empty: without turns there is no reply latency to measure."""
        return types.MappingProxyType({})

    def timeline_ms(self, now: float) -> int:
        """Where the session timeline is at shell time ``now``: the furthest any transcript
        reached, or the time since ``session.started`` if that is further."""
        since = 0 if self._started_at is None else round((now - self._started_at) * 1000)
        return max(self.utterances.timeline_ms, since)

    # -- ProtocolCore: outbound --------------------------------------------------------------
    def opening(self) -> list[str]:
        """``session.start``: the first message of the connection."""
        return [self.send(SessionStart(self.config))]

    def audio(self, pcm: bytes) -> str:
        """``session.input_audio.append`` of microphone audio (only once started)."""
        if self.phase is not Phase.STARTED:
            raise LocalProtocolError(f"cannot send audio: the session is {self.phase.value}")
        return encode(AudioAppend(pcm), f"evt_live_{next(self._event_ids)}")

    def send(self, event: ClientEvent) -> str:
        """The wire JSON of ``event`` with this instance's next event id; remembers it."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: session closed")
        first = isinstance(event, SessionStart)
        if first != (self.phase is Phase.CONNECTING and self._start_id is None):
            raise LocalProtocolError("session.start is the first event, and only once")
        event_id = f"evt_live_{next(self._event_ids)}"
        if first:
            self._start_id = event_id
        elif isinstance(event, SessionClose):
            self.phase = Phase.CLOSING
        if not isinstance(event, AudioAppend):
            self.sent[event_id] = event.TYPE
            while len(self.sent) > MAX_SENT:
                self.sent.popitem(last=False)
        return encode(event, event_id)

    # -- ProtocolCore: inbound ---------------------------------------------------------------
    def receive(self, message: str | bytes, now: float) -> list[Action]:
        """One message from the service, received at ``now``; junk is counted and ignored."""
        try:
            event = parse_event(message)
        except ProtocolError:
            self.junk_messages += 1
            return []
        return self.receive_event(event, now)

    def receive_event(self, event: ServerEvent, now: float) -> list[Action]:
        """Apply one parsed server event received at ``now``."""
        self._now = max(self._now, now)
        handler = self._HANDLERS.get(type(event))
        out = handler(self, event, now) if handler else []
        return out + self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: commit the utterances a pause has closed."""
        self._now = max(self._now, now)
        if self.phase is Phase.CLOSED:
            return []
        return self._after(self.utterances.due(self._now, self.timeline_ms(self._now)))

    def connection_lost(self, code: int | None = None, reason: str = "") -> list[Action]:
        """The transport is gone: commit what is open (partial, unless the session had ended),
        no more sending. Calling it again returns nothing."""
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        self.tools.stop()
        lost = self.end is None or self.end.kind is End.LOST
        said = ": ".join(str(x) for x in (code, reason) if x)
        self._end(EndReason(End.LOST, f"connection lost ({said})" if said else
                            "connection lost"))
        return self._after(self.utterances.flush(partial=lost))

    def finish(self, reason: EndReason) -> list[str]:
        """The session ends for ``reason`` (ignored if it had already ended). While it is
        started: ``session.close`` to send, which the service answers with ``session.closed``
        (the final usage) before it closes the connection."""
        self._end(reason)
        if self.phase is not Phase.STARTED:
            return []
        return [self.send(SessionClose())]

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker stopped robot utterance ``item_id`` after ``played_samples`` at 24 kHz:
        it is stored interrupted with what was played. The service needs nothing: the model
        heard the person and stopped by itself."""
        out = self.utterances.interrupted(item_id, played_samples)
        if out:
            self._goodbye = None  # the person talked over the goodbye: no hang-up
        return self._after(out)

    def first_played(self, item_id: str, at: float) -> list[Action]:
        return []

    def tool_finished(self, result: StoreToolResult, *, hang_up: bool = False) -> list[Action]:
        """A tool the shell ran for :class:`CallTool` finished: record the result and send its
        output. ``hang_up``: it was ``end_conversation``, so the robot's next utterance is
        the goodbye, after which :class:`HangUp` comes."""
        open_ = self.phase is not Phase.CLOSED
        out: list[Action] = [result, *self.tools.answered(result, send=open_)]
        if hang_up and open_:
            self._goodbye = self.timeline_ms(self._now)
        return out

    # -- handlers ----------------------------------------------------------------------------
    def _on_started(self, ev: SessionStarted, now: float) -> list[Action]:
        self.phase, self.session_id, self.model = Phase.STARTED, ev.session_id, ev.model
        self._started_at = now
        return [StoreSession(ev.session_id, ev.model)]

    def _on_transcript(self, ev: TranscriptDelta, now: float) -> list[Action]:
        return self._after(self.utterances.delta(ev, now))

    def _on_audio(self, ev: AudioDelta, now: float) -> list[Action]:
        if self.phase is Phase.CLOSED or not ev.pcm:
            return []
        item = self.utterances.audio(len(ev.pcm) // 2, now, self.timeline_ms(now))
        return [Play(item, ev.pcm)]

    def _on_delegation(self, ev: DelegationCreated, now: float) -> list[Action]:
        self.tools.delegated(ev)
        if ev.target == "client" and self.phase is Phase.STARTED:
            return [Send(CommentaryAppend(NO_BACKEND, ev.delegation_id))]
        return []

    def _on_backend_response(self, ev: BackendResponse, now: float) -> list[Action]:
        return self.tools.response(ev)

    def _on_backend_call(self, ev: BackendCall, now: float) -> list[Action]:
        return self.tools.call(ev, self.timeline_ms(now))

    def _on_usage(self, ev: UsageUpdated, now: float) -> list[Action]:
        self.usage_seconds = ev.seconds
        return [StoreUsage(self.session_id, ev.seconds)] if self.session_id else []

    def _on_closed(self, ev: SessionClosed, now: float) -> list[Action]:
        kind = CLOSE_ENDS.get(ev.reason, End.LOST)
        if ev.reason == "close_requested" and self.phase is Phase.CLOSING:
            kind = End.DONE
        self._end(EndReason(kind, f"session closed by the service ({ev.reason})"))
        out: list[Action] = []
        if ev.seconds is not None and self.session_id:
            self.usage_seconds = ev.seconds
            out.append(StoreUsage(self.session_id, ev.seconds, final=True))
        out += self.utterances.flush(partial=False)
        self.phase = Phase.CLOSED
        self.tools.stop()
        return self._after(out)

    def _on_error(self, ev: ServiceError, now: float) -> list[Action]:
        self.last_error = ev
        refused = ev.client_event_id is not None and ev.client_event_id == self._start_id
        fatal = ev.fatal or refused
        message = ev.message + (f" ({ev.param})" if ev.param else "")
        ours = self.sent.get(ev.client_event_id or "")
        if ours:
            message += f" (in reply to our {ours})"
        if fatal:
            what = "refused the session configuration" if refused else "refused"
            self._end(EndReason(End.FATAL, f"the Live service {what}: {message}"
                                + (f" [{ev.code}]" if ev.code else "")))
        return [StoreError(ev.type, ev.code, message, fatal)]

    _HANDLERS: ClassVar[dict[type, Callable[[LiveConversation, Any, float], list[Action]]]] = {
        SessionStarted: _on_started,
        TranscriptDelta: _on_transcript,
        AudioDelta: _on_audio,
        DelegationCreated: _on_delegation,
        BackendResponse: _on_backend_response,
        BackendCall: _on_backend_call,
        UsageUpdated: _on_usage,
        SessionClosed: _on_closed,
        ServiceError: _on_error,
    }

    # -- helpers -----------------------------------------------------------------------------
    def _end(self, reason: EndReason) -> None:
        """How the session ended, if nobody said so before."""
        if self.end is None:
            self.end = reason

    def _after(self, actions: list[Action]) -> list[Action]:
        """The goodbye: after ``end_conversation``, the robot's next utterance (not talked
        over) is followed by :class:`HangUp`."""
        out: list[Action] = []
        for action in actions:
            out.append(action)
            if self._goodbye is None:
                continue
            if isinstance(action, BargeIn):
                self._goodbye = None
            elif (isinstance(action, StoreMessage) and action.role == "assistant"
                  and action.seq > self._goodbye):
                self._goodbye = None
                out.append(HangUp())
        return out
