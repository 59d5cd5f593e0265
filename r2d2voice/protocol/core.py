"""The seam between the link (the trio shell around one websocket) and a protocol core.

A core is one service session, both directions, as data (after h11 and wsproto): the link hands
it every message received and the transport's loss, and carries out the actions it answers with
(:mod:`.actions`); what goes out is serialised by the core. The Realtime core
(``realtime.conversation.Conversation``) and the GPT-Live core (``live/``) both implement
:class:`ProtocolCore`, so the link and the appliance never name a wire protocol.

How a connection ended is one :class:`EndReason`, set once by whoever notices first (the
core from the service's events and close codes: fatal, expired; the shell: done, recycle,
hang-up, lost) — later writers are ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from r2d2voice.protocol.actions import Action, ClientEvent
from r2d2voice.protocol.tool_records import StoreToolResult

#: How often a core whose pauses matter (GPT-Live) asks to be ticked: its ``tick_interval``
#: (seconds of the shell's monotonic clock).
TICK_S = 0.1


class End(enum.Enum):
    """Why a connection ended, and so what comes next."""

    DONE = "done"  # we closed it: the input ended, or the run is stopping
    RECYCLE = "recycle"  # we closed it to start a fresh session before the service's limit
    HANGUP = "hangup"  # we closed it after the goodbye (end_conversation): a new conversation
    EXPIRED = "expired"  # the service ended the session at its limit: a new one at once
    LOST = "lost"  # the link died or the service dropped it: reconnect with backoff
    FATAL = "fatal"  # no retry can help (a refused key, no quota, a bad model): exit 3


@dataclass(frozen=True, slots=True)
class EndReason:
    kind: End
    detail: str = ""

    @property
    def ours(self) -> bool:
        """We closed it (a close code the service sends after that means nothing)."""
        return self.kind in (End.DONE, End.RECYCLE, End.HANGUP)


class LocalProtocolError(RuntimeError):
    """The shell asked a core for something its state forbids (sending on a closed session,
    audio before the service started it): the link treats the connection as closed."""


class ProtocolCore(Protocol):
    """One service session as the link drives it. Times are seconds of the monotonic clock the
    shell supplies; a core never reads a clock, does no I/O and imports no trio."""

    #: how the session ended (None while it goes on); set once, first writer wins
    end: EndReason | None
    #: the shell calls :meth:`tick` this often (None: never)
    tick_interval: float | None
    #: turns the service took from the person, and replies it finished (a source waiting for
    #: its turn to be answered watches them)
    turns_committed: int
    responses_done: int

    def opening(self) -> list[str]:
        """Wire messages to send first, in order (the session's configuration, context)."""

    def audio(self, pcm: bytes) -> str:
        """The wire message carrying microphone audio (24 kHz mono PCM16)."""

    def send(self, event: ClientEvent) -> str:
        """The wire message of a client event the core asked for (:class:`~.actions.Send`);
        raises when the state forbids it (the connection is closed)."""

    def receive(self, message: str | bytes, now: float) -> list[Action]:
        """One message from the service, received at ``now``."""

    def connection_lost(self, code: int | None, reason: str) -> list[Action]:
        """The transport is gone (close code and reason, if any): flush what is partial."""

    def finish(self, reason: EndReason) -> list[str]:
        """The shell ends the session for ``reason`` (ignored if it has already ended): wire
        messages to send before the transport closes, in order. None (Realtime: the socket's
        close is the end) or a request the service answers before it closes the connection
        (GPT-Live: ``session.close``, answered with the final usage); the shell then waits a
        bounded time for the service to close."""

    def interrupted(self, item_id: str, played_samples: int) -> list[Action]:
        """The speaker stopped reply ``item_id`` after ``played_samples`` (barge-in)."""

    def first_played(self, item_id: str, at: float) -> list[Action]:
        """The first sample of reply ``item_id`` reached the speaker at ``at``."""

    def tool_finished(self, result: StoreToolResult, *, hang_up: bool) -> list[Action]:
        """A tool call the core asked for (:class:`~.actions.CallTool`) finished."""

    def tool_says(self, text: str) -> list[Action]:
        """A running call has the model told ``text`` (and answer it: a call waiting for the
        person's yes has the model ask)."""

    def tools_offered(self, tools: tuple[dict[str, Any], ...]) -> list[Action]:
        """The tools on offer changed mid-session (an MCP server came, went, changed)."""

    def tick(self, now: float) -> list[Action]:
        """Time passed without a message (every :attr:`tick_interval` s): what a pause has
        closed (GPT-Live commits an utterance once its speaker paused)."""

    def give_up_transcripts(self) -> list[str]:
        """Stop waiting for the person's transcripts that never came; their ids."""

    def statistics(self) -> dict[str, int]:
        """This session's counts (junk messages, benign errors, audio dropped as leftover)."""

    def status(self, playing: bool) -> str:
        """What the robot is doing, in a few words (``playing``: reply audio is queued)."""

    @property
    def user_speaking(self) -> bool:
        """The service hears the person."""

    @property
    def waiting_for_transcript(self) -> bool:
        """Everything is done but a transcript of the person that is still to come."""

    @property
    def configured(self) -> bool:
        """The service accepted the session's configuration."""

    @property
    def audio_ready(self) -> bool:
        """Microphone audio may go (after :meth:`opening`): at once for Realtime, once the
        service started the session for GPT-Live. The uplink waits for it."""

    @property
    def idle(self) -> bool:
        """Nobody speaks, no reply is being made, no tool runs: the next turn may go."""

    @property
    def settled(self) -> bool:
        """Idle, and nothing said is still to be stored."""

    @property
    def awaiting_play(self) -> Mapping[str, object]:
        """Reply items whose first played sample is still to be reported."""
