"""A run's body: everything that follows its event stream (system/events.py) from outside —
the ``events`` socket, the tools file's hooks, MQTT with Home Assistant — planned with
:func:`plan_body` (bad hooks or MQTT settings fail before anything starts) and opened once
for ``run`` and ``replay`` with :func:`open_body` (``compose.hold``).

The moments themselves are emitted where they happen: the link (``link/moments.py``: the
turn, the speaker, tools, sessions and conversations), the session gates (``gate.py``: wake,
waiting for it), the devices (``audio/availability.py``, through :func:`events.emit`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.appliance.tools import Toolbox
from r2d2voice.appliance.tools.builtins import Volume
from r2d2voice.appliance.tools.hooks import HookSpec, read_hooks, run_hooks
from r2d2voice.system import events
from r2d2voice.system.config import Settings
from r2d2voice.system.event_socket import serve_events
from r2d2voice.system.events import Events

if TYPE_CHECKING:
    from r2d2voice.appliance.switch import ListeningSwitch
    from r2d2voice.system.mqtt import MqttTarget

log = logging.getLogger("r2d2voice.appliance.body")

__all__ = ["BODY_DRAIN_S", "BodyPlan", "RunCommands", "open_body", "plan_body",
           "volume_only"]

#: after the run, its followers (socket, hooks, MQTT) have this long in all
BODY_DRAIN_S = 2.5


@dataclass(frozen=True)
class BodyPlan:
    """What follows the run, from the settings: the hooks of ``R2D2_TOOLS`` and, with
    ``R2D2_MQTT_URL``, the broker (``device_id`` names this robot's topics)."""

    hooks: tuple[HookSpec, ...] = ()
    mqtt: MqttTarget | None = None
    device_id: str = ""
    prefix: str = "homeassistant"
    #: the CA certificates an mqtts:// broker is checked against (None: the system's)
    mqtt_ca: str | None = None

    @property
    def remote(self) -> bool:
        """Something outside may command the run (the listening switch, the volume)."""
        return self.mqtt is not None


def plan_body(settings: Settings) -> BodyPlan:
    """ConfigError (exit 3) for a bad hook, MQTT URL or device id: before anything starts."""
    from r2d2voice.appliance.tools.mcp.config import variables
    from r2d2voice.system.mqtt import parse_mqtt_url

    hooks = read_hooks(settings.tools, variables(settings.env_file)) if settings.tools else ()
    if not settings.mqtt_url:
        return BodyPlan(hooks)
    target = parse_mqtt_url(settings.mqtt_url)
    if target.tls and settings.mqtt_ca:
        _check_ca(settings.mqtt_ca)
    return BodyPlan(hooks, target, _device_id(settings), settings.mqtt_prefix,
                    settings.mqtt_ca if target.tls else None)


def _check_ca(path: str) -> None:
    import ssl

    from r2d2voice.errors import ConfigError

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"R2D2_MQTT_CA {path}: not a readable PEM file of CA certificates "
                          f"({why})") from None


@dataclass(eq=False)
class RunCommands:
    """What MQTT (and later other remotes) may do to the run: system/mqtt.py's RunControl.
    ``volume_control`` is the one the ``set_volume`` tool sets (persisted); ``on_wake``
    starts a conversation (None: a replay, which hears only its file); ``switch`` is the
    session gate's listening switch (``switch.py``; None: always on)."""

    volume_control: Volume
    on_wake: Callable[[], object] | None = None
    switch: ListeningSwitch | None = None
    settings: Settings | None = None

    @property
    def volume(self) -> int:
        return self.volume_control.percent

    @property
    def listening(self) -> bool:
        return self.switch is None or self.switch.on

    def wake(self) -> None:
        if not self.listening:
            log.info("wake: ignored, listening is switched off")
        elif self.on_wake is None:
            log.info("wake: a replay hears only its file (ignored)")
        else:
            self.on_wake()

    async def set_volume(self, percent: int) -> None:
        await self.volume_control.set(percent)

    async def set_listening(self, on: bool) -> None:
        await trio.lowlevel.checkpoint()
        if self.switch is not None:
            self.switch.set(on)

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


@asynccontextmanager
async def open_body(plan: BodyPlan, hub: Events, commands: RunCommands) -> AsyncIterator[Events]:
    """``hub`` followed by the events socket, the hooks and, with MQTT, the bridge, for the
    ``with`` block (installed for :func:`events.emit` there: the devices emit through it).
    On the way out the hub closes and the followers get :data:`BODY_DRAIN_S` in all to
    finish (MQTT says ``offline``). A follower that fails is logged; the run goes on."""
    from r2d2voice.system.mqtt import MqttBridge

    async with trio.open_nursery() as nursery:
        await nursery.start(_guarded, "the events socket", serve_events, hub)
        if plan.hooks:
            await nursery.start(_guarded, "the hooks", run_hooks, plan.hooks, hub)
        if plan.mqtt is not None:
            bridge = MqttBridge(plan.mqtt, plan.device_id, hub, commands, prefix=plan.prefix,
                                ca_certs=plan.mqtt_ca)
            await nursery.start(_guarded, "MQTT", bridge.run)
        try:
            with events.use(hub):
                yield hub
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


def volume_only(settings: Settings) -> Toolbox:
    """No tools, only the volume kept next to the database (MQTT sets it without a tools file
    too)."""
    from r2d2voice.appliance.compose import TOOL_STATE_FILE

    return Toolbox(state_path=Path(os.fspath(settings.db)).parent / TOOL_STATE_FILE)
