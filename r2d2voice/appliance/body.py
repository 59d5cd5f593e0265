"""A run's body: its event stream (system/events.py) and everything that follows it from outside
— the ``events`` socket, the tools file's hooks, MQTT with Home Assistant — composed once for
``run`` and ``replay`` with :func:`open_body`.

The pipeline's own emission points are ``events.emit(...)`` calls where the moments happen.
Until those exist, two adapters derive what can be seen from outside the pipeline:
:class:`EventConsole` (the conversation's status and transcripts → ``listening``,
``user_speaking``, ``user_stopped``, ``thinking``, ``waiting_for_wake``, ``transcript``) and
:class:`MeteredSink` (what the speaker takes → ``speaking``, ``level``, ``spoken``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import trio

from r2d2voice.appliance.context import Console, Sink
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.appliance.tools.builtins import Volume
from r2d2voice.appliance.tools.hooks import read_hooks, run_hooks
from r2d2voice.audio.earcons import is_earcon
from r2d2voice.audio.pcm import RATE
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.system import events
from r2d2voice.system.config import Settings
from r2d2voice.system.event_socket import serve_events
from r2d2voice.system.events import LEVEL, Events

log = logging.getLogger("r2d2voice.appliance.body")

__all__ = ["LEVEL_WINDOW", "Body", "EventConsole", "MeteredSink", "RunCommands", "open_body",
           "run_toolbox"]

#: one ``level`` event per this many samples played (50 ms: 20 a second)
LEVEL_WINDOW = RATE // 20
#: after the run, its followers (socket, hooks, MQTT) have this long in all
BODY_DRAIN_S = 2.5


@dataclass(eq=False)
class RunCommands:
    """What MQTT (and later other remotes) may do to the run: the RunControl of
    system/mqtt.py. ``on_wake`` starts a conversation; ``volume`` is the one the
    ``set_volume`` tool sets (persisted); the listening switch is kept here for the session
    gate to consult (``listening``)."""

    volume_control: Volume
    on_wake: Callable[[], None]
    settings: Settings | None = None
    listening: bool = True

    @property
    def volume(self) -> int:
        return self.volume_control.percent

    def wake(self) -> None:
        self.on_wake()

    async def set_volume(self, percent: int) -> None:
        await self.volume_control.set(percent)

    async def set_listening(self, on: bool) -> None:
        self.listening = on

    async def cost_today(self) -> float | None:
        if self.settings is None:
            return None
        return await trio.to_thread.run_sync(_cost_today, self.settings)


def _cost_today(settings: Settings) -> float | None:
    """Today's (UTC) estimated cost from the record, as ``usage`` shows it."""
    from r2d2voice.errors import R2Error
    from r2d2voice.reports.source import open_records
    from r2d2voice.reports.usage import Prices, usage_report

    since = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        with open_records(settings.db) as records:
            report = usage_report(records.read, Prices.from_settings(settings), since=since)
    except (R2Error, OSError) as exc:
        log.debug("today's cost not known: %s", exc)
        return None
    return float(report["total"]["cost_usd"])


@dataclass(eq=False)
class Body:
    """What :func:`open_body` gives the run: the hub, and the adapters that feed it."""

    hub: Events
    _meter: _Metered | None = None

    def sink(self, sink: Sink) -> MeteredSink:
        """``sink``, reporting what reaches the speaker (one sink per run)."""
        metered = MeteredSink(sink, self.hub)
        self._meter = metered.meter
        return metered

    def console(self, console: Console) -> EventConsole:
        """``console``, reporting the conversation's status and transcripts."""
        return EventConsole(console, self.hub, self._state_changed)

    def _state_changed(self) -> None:
        if self._meter is not None:
            self._meter.over()


@asynccontextmanager
async def open_body(settings: Settings, control: RunCommands, *,
                    hub: Events | None = None) -> AsyncIterator[Body]:
    """The run's hub, followed by the events socket, the hooks of ``R2D2_TOOLS`` and, with
    ``R2D2_MQTT_URL``, the MQTT bridge; installed for :func:`events.emit` inside the block. On
    the way out the hub closes and the followers get :data:`BODY_DRAIN_S` to finish (MQTT
    says ``offline``). Bad hooks or MQTT settings are a ConfigError before anything starts."""
    from r2d2voice.system.mqtt import MqttBridge, parse_mqtt_url

    hooks = read_hooks(settings.tools) if settings.tools else ()
    target = parse_mqtt_url(settings.mqtt_url) if settings.mqtt_url else None
    device_id = _device_id(settings) if target else ""
    hub = hub or Events(privacy=not settings.store_text)
    async with trio.open_nursery() as nursery:
        await nursery.start(_guarded, "the events socket", serve_events, hub)
        if hooks:
            await nursery.start(_guarded, "the hooks", run_hooks, hooks, hub)
        if target is not None:
            bridge = MqttBridge(target, device_id, hub, control, prefix=settings.mqtt_prefix)
            await nursery.start(_guarded, "MQTT", bridge.run)
        try:
            with events.use(hub):
                yield Body(hub)
        finally:
            hub.close()
            nursery.cancel_scope.deadline = trio.current_time() + BODY_DRAIN_S
            nursery.cancel_scope.shield = True


async def _guarded(what: str, follower: Callable[..., Any], *args: Any,
                   task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """A follower that fails is logged; the conversation goes on (its queue is just left)."""
    try:
        await follower(*args, task_status=task_status)
    except Exception as exc:
        log.error("%s stopped on an unexpected %s: %s (the conversation goes on)", what,
                  type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))


def _device_id(settings: Settings) -> str:
    from r2d2voice.errors import ConfigError
    from r2d2voice.storage.shipping.device import resolve_device_id

    device_id = resolve_device_id(settings.device_id)
    if any(c in device_id for c in "/+#"):
        raise ConfigError(f"R2D2_DEVICE_ID {device_id!r} cannot name MQTT topics")
    return device_id


class EventConsole:
    """A console that also emits what the conversation's status and transcripts say."""

    _STATUSES: ClassVar[dict[str, str]] = {
        "listening (you are speaking)": "user_speaking", "thinking": "thinking",
        "listening": "listening"}

    def __init__(self, console: Console, hub: Events,
                 on_change: Callable[[], None] | None = None) -> None:
        self.console = console
        self.hub = hub
        self.on_change = on_change
        self.last: str | None = None

    def __getattr__(self, name: str) -> Any:  # the wrapped console's other methods
        return getattr(self.console, name)

    def transcript(self, role: str, text: str) -> None:
        self.console.transcript(role, text)
        self.hub.emit("transcript", role=role, text=text)

    def status(self, text: str) -> None:
        self.console.status(text)
        inner = text
        if inner.startswith("in conversation (") and inner.endswith(")"):
            inner = inner[len("in conversation ("):-1]
        name = ("waiting_for_wake" if text.startswith("waiting for '")
                else self._STATUSES.get(inner, inner))
        if name == self.last:
            return
        if self.on_change is not None and name != "speaking":
            self.on_change()  # a reply no longer playing is spoken (MeteredSink)
        if self.last == "user_speaking":
            self.hub.emit("user_stopped")
        self.last = name
        if name in events.STATES and name != "speaking":  # speaking: the speaker says it
            self.hub.emit(name)


class MeteredSink:
    """A sink that reports what reaches the speaker: ``speaking {item_id}`` at an item's first
    sample, ``level {rms}`` per :data:`LEVEL_WINDOW` samples while followers want it, and
    ``spoken {item_id, interrupted, played_ms}`` when it is over: another item begins, or the
    conversation is no longer speaking (:meth:`_Metered.over`, from :class:`EventConsole`),
    which covers a reply cut short too. Earcons count for ``level`` only."""

    def __init__(self, sink: Sink, hub: Events) -> None:
        self.sink = sink
        self.hub = hub
        self.meter = _Metered(hub)

    def __getattr__(self, name: str) -> Any:  # samples_written, stats, …
        return getattr(self.sink, name)

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        self.meter.buffer = buffer
        await self.sink.run(receive, self.meter)  # type: ignore[arg-type]


class _Metered:
    """The playout buffer as the speaker sees it, measured as it is read (on the speaker's
    thread: the moments reach the run's loop through the hub)."""

    def __init__(self, hub: Events) -> None:
        self.buffer: PlayoutBuffer | None = None
        self._hub = hub
        self._lock = threading.Lock()
        self._item: str | None = None
        self._squares = 0.0
        self._count = 0

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.buffer, name)

    def read_into(self, out: np.ndarray) -> int:
        assert self.buffer is not None
        head = self.buffer.playing_item()
        written = self.buffer.read_into(out)
        self._measured(out[:written], head)
        return written

    def over(self) -> None:
        """The conversation stopped speaking: the item playing last is spoken."""
        with self._lock:
            self._ended()

    def read(self, n: int) -> np.ndarray:
        out = np.empty(max(0, n), dtype=np.int16)
        return out[:self.read_into(out)]

    def _measured(self, pcm: np.ndarray, head: str | None) -> None:
        with self._lock:
            hub = self._hub
            if head is not None and head != self._item and len(pcm) and not is_earcon(head):
                self._ended()
                self._item = head
                hub.emit("speaking", item_id=head)
            if hub.wants(LEVEL) and len(pcm):
                self._levels(pcm.astype(np.float64) / 32768.0)

    def _ended(self) -> None:
        item, self._item = self._item, None
        if item is None or self.buffer is None:
            return
        played = self.buffer.played_samples(item)
        self._hub.emit("spoken", item_id=item,
                       interrupted=played < self.buffer.received_samples(item),
                       played_ms=round(played * 1000 / RATE))

    def _levels(self, samples: np.ndarray) -> None:
        at = 0
        while at < len(samples):
            take = min(LEVEL_WINDOW - self._count, len(samples) - at)
            part = samples[at:at + take]
            self._squares += float(np.dot(part, part))
            self._count += take
            at += take
            if self._count == LEVEL_WINDOW:
                rms = (self._squares / LEVEL_WINDOW) ** 0.5
                self._hub.emit(LEVEL, rms=round(min(1.0, rms), 4))
                self._squares, self._count = 0.0, 0


def run_toolbox(settings: Settings) -> Toolbox:
    """The run's tools (``R2D2_TOOLS``; ConfigError for a bad file), or none but the volume
    kept next to the database: MQTT sets it without a tools file too."""
    from r2d2voice.appliance.compose import TOOL_STATE_FILE, open_toolbox

    return open_toolbox(settings) or Toolbox(
        state_path=Path(os.fspath(settings.db)).parent / TOOL_STATE_FILE)
