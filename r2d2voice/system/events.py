"""The conversation as a stream of moments, for whatever follows the robot from outside: the
``events`` socket (``r2d2voice events``), hooks, MQTT.

Each moment is one JSON object: ``event`` (one of :data:`FIELDS`), ``t`` (a wall-clock label,
``YYYY-MM-DDTHH:MM:SS.mmmZ``), ``mono`` (``time.monotonic()`` seconds: CLOCK_MONOTONIC, the
same clock in every process of the machine, so a follower can measure intervals), ``session_id``
(the service session it belongs to, null between sessions) and the event's own fields.

:class:`Events` is the hub. :meth:`Events.emit` never blocks and never raises: callable from the
trio thread and from any other (an audio callback), it stamps the moment and hands it to every
subscriber's bounded queue; a full queue drops the moment and counts it (a slow follower never
delays the conversation). ``level`` (about 20 a second while a reply plays) goes only to the
subscribers that ask for it, and nothing is even built while nobody listens. In privacy mode
(``R2D2_STORE_TEXT=false``) ``transcript`` is never emitted.

The link and the session gates are given the run's hub (``LinkParts.events``); where a part
has none at hand (the sound devices' availability), :func:`emit` reaches the one installed for
the run with :func:`use` (a context variable that the run's tasks inherit).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from r2d2voice.storage.timestamps import format_ts, utc_now

log = logging.getLogger("r2d2voice.system.events")

__all__ = ["FIELDS", "LEVEL", "NAMES", "STATES", "Events", "Moment", "Subscription", "current",
           "emit", "use"]

#: Every event and its fields, in the order the issue's table names them.
FIELDS: dict[str, tuple[str, ...]] = {
    "listening": (),
    "waiting_for_wake": (),
    "wake": ("source", "score"),
    "user_speaking": (),
    "user_stopped": (),
    "thinking": (),
    "speaking": ("item_id",),
    "level": ("rms",),
    "spoken": ("item_id", "interrupted", "played_ms"),
    "transcript": ("role", "text"),
    "tool_started": ("name",),
    "tool_finished": ("name", "status"),
    "conversation_started": (),
    "conversation_ended": ("reason",),
    "device_lost": ("kind", "name"),
    "device_back": ("kind", "name"),
    "budget": ("spent", "cap"),
    "error": ("message",),
}
NAMES = tuple(FIELDS)
LEVEL = "level"
#: The events that say what the robot is doing now (MQTT's state, STATUS=-like).
STATES = ("listening", "waiting_for_wake", "user_speaking", "thinking", "speaking")
#: A subscriber's queue unless it asks for another bound.
DEFAULT_BOUND = 64


@dataclass(frozen=True)
class Moment:
    """One emitted event: its name, its JSON object, and that object as one line of text."""

    name: str
    data: dict[str, Any]
    line: str


@dataclass(eq=False)
class Subscription:
    """One follower's queue: ``receive`` yields :class:`Moment` until the hub closes (or the
    subscription is left); ``dropped`` counts what did not fit."""

    names: frozenset[str]
    receive: trio.MemoryReceiveChannel[Moment]
    _send: trio.MemorySendChannel[Moment] = field(repr=False)
    dropped: int = 0

    def wants(self, name: str) -> bool:
        return name in self.names


class Events:
    """The hub of one run (see the module docstring). ``clock`` gives ``mono``, ``wall`` the
    ``t`` label; ``privacy`` withholds ``transcript``."""

    def __init__(self, *, privacy: bool = False, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], str] = lambda: format_ts(utc_now())) -> None:
        self.privacy = privacy
        self.clock = clock
        self.wall = wall
        self.session_id: str | None = None
        self.closed = False
        self._subscribers: list[Subscription] = []
        self._levels = 0  # subscribers that take level
        self._warned: set[str] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: int | None = None
        self._closed_event: trio.Event | None = None

    # -- followers --------------------------------------------------------------------------
    def subscribe(self, names: Collection[str] | None = None, *, level: bool = False,
                  bound: int = DEFAULT_BOUND) -> Subscription:
        """A queue of ``bound`` moments of ``names`` (None: every event but ``level``; naming
        ``level`` or ``level=True`` adds it). Call from the trio thread; leave with
        :meth:`unsubscribe` (or :meth:`following`). ValueError for an unknown name."""
        self._bind()
        chosen = set(NAMES) - {LEVEL} if names is None else set(names)
        unknown = sorted(chosen - set(NAMES))
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r} (known: {', '.join(NAMES)})")
        if level:
            chosen.add(LEVEL)
        send, receive = trio.open_memory_channel[Moment](bound)
        sub = Subscription(frozenset(chosen), receive, send)
        if self.closed:
            send.close()
        else:
            self._subscribers.append(sub)
            self._levels += LEVEL in sub.names
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
            self._levels -= LEVEL in sub.names
        sub._send.close()

    @contextlib.contextmanager
    def following(self, names: Collection[str] | None = None, *, level: bool = False,
                  bound: int = DEFAULT_BOUND) -> Iterator[Subscription]:
        """:meth:`subscribe` for the length of a ``with`` block."""
        sub = self.subscribe(names, level=level, bound=bound)
        try:
            with sub.receive:
                yield sub
        finally:
            self.unsubscribe(sub)

    def wants(self, name: str) -> bool:
        """Whether anyone takes ``name`` now (a producer may skip measuring what nobody reads)."""
        if name == LEVEL:
            return self._levels > 0
        return any(name in s.names for s in self._subscribers)

    def close(self) -> None:
        """No more moments: every follower drains what it holds, then sees the end."""
        self.closed = True
        if self._closed_event is not None:
            self._closed_event.set()
        for sub in self._subscribers:
            sub._send.close()
        self._subscribers.clear()
        self._levels = 0

    async def wait_closed(self) -> None:
        """Until :meth:`close` (from the run's thread)."""
        if not self.closed:
            if self._closed_event is None:
                self._closed_event = trio.Event()
            await self._closed_event.wait()

    # -- producers --------------------------------------------------------------------------
    def set_session(self, session_id: str | None) -> None:
        """The service session the next moments belong to (None: between sessions)."""
        self.session_id = session_id

    def emit(self, name: str, /, **fields: Any) -> None:
        """Hand ``name`` with ``fields`` to its followers; never blocks, never raises. From a
        thread other than the run's, the moment is stamped here and delivered by the run's
        loop."""
        self.emit_for(self.session_id, name, **fields)

    def emit_for(self, session_id: str | None, name: str, /, **fields: Any) -> None:
        """:meth:`emit`, of service session ``session_id`` (a reply that plays on after its
        session ended is still its session's)."""
        try:
            if self.closed or (name == LEVEL and not self._levels) or not self._subscribers:
                return
            if name == "transcript" and self.privacy:
                return
            if not self._valid(name, fields):
                return
            data = {"event": name, "t": self.wall(), "mono": round(self.clock(), 3),
                    "session_id": session_id, **fields}
            if self._thread is None or threading.get_ident() == self._thread:
                self._deliver(data)
            elif self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._deliver, data)
        except Exception as exc:  # an observer must never break the conversation
            self._warn_once(f"failed:{name}", "event %s not emitted: %r", name, exc)

    def _deliver(self, data: dict[str, Any]) -> None:
        """On the run's thread: one moment to each follower that takes it (never raises: it
        may run as a callback of trio's loop)."""
        name = data["event"]
        try:
            takers = [s for s in self._subscribers if name in s.names]
            if not takers:
                return
            moment = Moment(name, data, json.dumps(data, ensure_ascii=False, default=str))
            for sub in takers:
                try:
                    sub._send.send_nowait(moment)
                except trio.WouldBlock:
                    sub.dropped += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self.unsubscribe(sub)  # its reader is gone
        except Exception as exc:
            self._warn_once(f"failed:{name}", "event %s not delivered: %r", name, exc)

    def _valid(self, name: str, fields: dict[str, Any]) -> bool:
        expected = FIELDS.get(name)
        if expected is None:
            self._warn_once(f"name:{name}", "unknown event %r not emitted", name)
            return False
        if set(fields) != set(expected):
            self._warn_once(f"fields:{name}", "event %s needs fields %s, got %s: not emitted",
                            name, list(expected), sorted(fields))
            return False
        return True

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _bind(self) -> None:
        """Remember the run's loop and thread (the first subscriber does it, in the run)."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.get_ident()


_current: contextvars.ContextVar[Events | None] = contextvars.ContextVar(
    "r2d2voice_events", default=None)


@contextlib.contextmanager
def use(hub: Events) -> Iterator[Events]:
    """Make ``hub`` the run's (see :func:`emit`) for the ``with`` block and the tasks started
    in it."""
    token = _current.set(hub)
    try:
        yield hub
    finally:
        _current.reset(token)


def current() -> Events | None:
    """The hub installed with :func:`use`, if any."""
    return _current.get()


def emit(name: str, /, **fields: Any) -> None:
    """:meth:`Events.emit` on the run's hub; nothing when none is installed."""
    hub = _current.get()
    if hub is not None:
        hub.emit(name, **fields)

