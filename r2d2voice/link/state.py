"""The link's own state, and the ports the rest of a run plugs into it.

:class:`LinkState` (the current session's core, the playout buffer, counters, the connection
epoch) is the link's alone: its tasks wait on it through :class:`Watch`; everyone else gets the
typed waits of ``link/turns.py``. :class:`Sessions`, :class:`Console` and :class:`SessionGate`
are the ports the run plugs its store, its output and its listening policy into.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import trio

from r2d2voice.audio.gates import EchoGate
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.link.moments import Moments
from r2d2voice.protocol.core import EndReason
from r2d2voice.realtime.conversation import Conversation
from r2d2voice.system.config import default


class Watch:
    """Lets tasks wait until the run reaches some state (trio-only; one loop)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def next_change(self) -> None:
        await self._event.wait()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()

    async def hold(self, predicate: Callable[[], bool], seconds: float) -> None:
        """Until ``predicate`` has held for ``seconds`` in a row."""
        while True:
            await self.wait_for(predicate)
            with trio.move_on_after(seconds) as still:
                await self.wait_for(lambda: not predicate())
            if still.cancelled_caught:
                return


@dataclass
class Statistics:
    """The link's counters over a run; each session row stores its share."""

    frames_sent: int = 0
    frames_dropped: int = 0
    audio_chunks_dropped: int = 0
    record_waits: int = 0
    junk_messages: int = 0
    service_errors: int = 0
    #: ordinary races the service reports as errors (not counted in ``service_errors``)
    benign_errors: int = 0
    #: reply audio deltas dropped because the user had talked over that reply
    leftover_deltas: int = 0
    tool_calls: int = 0
    interruptions: int = 0
    reconnects: int = 0
    user_turns: int = 0
    assistant_turns: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LinkPolicy:
    """How the link behaves over a long run."""

    reconnect: bool = True
    #: a run that has never connected gives up after trying this long (None: never; a robot
    #: waits for its network, a replay should not)
    give_up_connecting: float | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: a session that lived this long resets the backoff
    healthy_after: float = 20.0
    #: recycle the connection at a quiet moment after this long (the service stops at 60 min)
    session_max_seconds: float = default("session_max_minutes") * 60
    #: this long without speech, reply or queued audio counts as a quiet moment
    quiet_seconds: float = 0.5
    #: turns re-sent as text items to a new session
    context_turns: int = default("context_turns")
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    #: once nothing else is open, wait this long for a late user transcript, then give up
    transcript_wait: float = 10.0
    #: "half": mic audio is not sent while a reply plays and for ``echo_tail`` after it
    duplex: str = default("duplex")
    echo_tail: float = default("echo_tail_ms") / 1000
    #: in half duplex, mic audio this loud (dBFS RMS) for ``barge_in_ms`` opens the gate
    #: (barge-in); None: no barge-in while the robot speaks
    barge_in_dbfs: float | None = default("barge_in_dbfs")
    barge_in_ms: int = 120

    def echo_gate(self) -> EchoGate:
        return EchoGate(self.echo_tail, self.barge_in_dbfs, self.barge_in_ms)


@dataclass(frozen=True)
class Opening:
    """A session may start: whether it begins a new conversation (no context carried), the
    keys its session row carries."""

    new_conversation: bool
    metadata: dict[str, Any] = field(default_factory=dict)


class SessionGate(Protocol):
    """Whether a session exists (always, after a wake word, dormant until speech, budget
    spent): the supervisor consults it; the microphone chain feeds it every frame."""

    async def wait_open(self) -> Opening | None:
        """Until a conversation may start; None once the run is over (input ended, stop)."""

    def take_preroll(self) -> list[bytes] | None:
        """At each connection's start: the frames held for it (since the wake or the speech
        onset), oldest first, which replace whatever waited in the uplink channel; None: the
        gate held nothing back (the channel's frames are the conversation's)."""

    async def wait_close(self) -> str:
        """Returns (with a reason) when the conversation in progress should end."""

    def ended(self, reason: EndReason) -> bool:
        """A connection of the conversation ended; True: the conversation goes on (another
        connection at once or after a backoff), False: it is over."""

    async def over(self, session_ids: list[str]) -> None:
        """The conversation is over; these were its sessions (none: it never connected)."""


@dataclass
class LinkState:
    """What the tasks of one run share: conversation state, playout buffer, counters."""

    conversation: Conversation
    buffer: PlayoutBuffer
    watch: Watch = field(default_factory=Watch)
    stats: Statistics = field(default_factory=Statistics)
    stopping: bool = False
    #: bumped for every new connection; a source can tell a turn was sent to a dead link
    epoch: int = 0
    connected: bool = False
    session_ids: list[str] = field(default_factory=list)
    #: what the link tells the run's event stream (a silent hub unless the run gives one)
    moments: Moments = field(default_factory=Moments)

    async def hold(self, predicate: Callable[[], bool], seconds: float) -> None:
        await self.watch.hold(predicate, seconds)

    def follow_playout(self) -> Callable[[], None]:
        """The playout buffer starts, drains and starts items on the audio thread: each of
        those wakes the link's watchers (status, recycle timer, hang-up) instead of polling.
        Returns what stops it."""
        token = trio.lowlevel.current_trio_token()
        changed = self.watch.changed

        def notify() -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(changed, idempotent=True)

        self.buffer.set_listener(notify)
        return lambda: self.buffer.set_listener(None)


class Sessions(Protocol):
    """The store's view of service sessions (the app implements it over SQLite)."""

    async def begin(self, previous: str | None, metadata: dict[str, Any]) -> str: ...
    async def end(self, session_id: str, stats: dict[str, int]) -> None: ...
    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]: ...


class Console(Protocol):
    def transcript(self, role: str, text: str) -> None: ...
    def status(self, text: str) -> None: ...


class FrameSource(Protocol):
    """What the link needs to know about where microphone frames come from."""

    #: live capture: frames queued while the link was down are stale, drop them
    live: bool
    #: the source sends a turn again when its link died (queued frames are stale then too)
    resends: bool
    #: frames the source itself dropped because the uplink queue was full
    frames_dropped: int


class Quiet:
    """A console that shows nothing."""

    def transcript(self, role: str, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass
