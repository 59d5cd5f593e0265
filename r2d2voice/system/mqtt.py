"""The robot in the home: its events on MQTT, with Home Assistant discovery, and commands back.

``R2D2_MQTT_URL=mqtt://[user:pass@]host[:port]`` (``mqtts://`` for TLS, checked against the
system's certificate authorities or those of ``R2D2_MQTT_CA``; ports 1883 / 8883 by default).
The password is never logged.
For ``R2D2_DEVICE_ID`` (default: the hostname), under ``r2d2voice/<device_id>/``:

==========================  =======================================================  ======
topic                       what                                                     retain
==========================  =======================================================  ======
``availability``            ``online``; ``offline`` at a clean stop and as the will  yes
``state``                   listening, waiting_for_wake, user_speaking, thinking,    yes
                            speaking; ``off`` while the listening switch is off
``transcript``              each utterance, ``{"role": …, "text": …}`` (not in        no
                            privacy mode)
``volume``, ``listening``   the volume (0..100) and the listening switch (ON/OFF)     yes
``cost_today``              today's estimated cost in USD                            yes
``wake/set``                any payload: start a conversation                        —
``volume/set``              0..100                                                   —
``listening/set``           ON / OFF (off: no session, the microphone goes nowhere)  —
==========================  =======================================================  ======

and Home Assistant discovery configs (retained) under ``<prefix>/<component>/r2d2voice_<node>/
<object>/config`` for the state, the last utterance, a wake button, a volume number, a listening
switch and today's cost, all one device. They are published again when Home Assistant announces
itself (``<prefix>/status`` = ``online``).

A broker that is down, refuses us or goes away never stops the conversation: the bridge
reconnects with backoff (1 s doubling to 60 s) and publishes the current state again. Moments
reach it through a bounded queue (drop-and-count); what happens while it is disconnected is
not published except as the state it leaves.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import trio

from r2d2voice import __version__
from r2d2voice.errors import ConfigError
from r2d2voice.system.events import STATES, Events, Moment
from r2d2voice.system.mqtt_link import Link

log = logging.getLogger("r2d2voice.system.mqtt")

__all__ = ["BACKOFF_MAX_S", "BACKOFF_S", "MqttBridge", "MqttTarget", "RunControl",
           "discovery_configs", "paho_client", "parse_mqtt_url"]

BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0
#: moments waiting for the bridge; beyond it dropped and counted
EVENTS_BOUND = 64
#: commands from the broker waiting to be applied; beyond it dropped and counted
COMMANDS_BOUND = 16
#: at a clean stop, ``offline`` and the DISCONNECT have this long
CLOSE_S = 1.0
#: the state while the listening switch is off
OFF = "off"
#: Home Assistant shows at most 255 characters as a sensor's state
_HA_STATE_MAX = 255
_FOLLOWED = (*STATES, "transcript", "spoken", "budget", "conversation_ended")


class RunControl(Protocol):
    """What MQTT commands act on; the run provides it."""

    @property
    def volume(self) -> int:
        """The playback volume now, 0..100."""

    @property
    def listening(self) -> bool:
        """Whether the robot may hold conversations (the listening switch)."""

    def wake(self) -> None:
        """Start a conversation, as the wake word would (from the run's thread)."""

    async def set_volume(self, percent: int) -> None: ...

    async def set_listening(self, on: bool) -> None: ...

    async def cost_today(self) -> float | None:
        """Today's estimated cost in USD (None: not known)."""


@dataclass(frozen=True)
class MqttTarget:
    """Where the broker is; ``str()`` never shows the password."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str, where: str = "R2D2_MQTT_URL") -> MqttTarget:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://…``; ConfigError (exit 3) otherwise,
    naming the key but never the password."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    shown = str(MqttTarget(parts.hostname or "?", port or 0, scheme == "mqtts", parts.username))
    if scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1:
        raise ConfigError(f"{where} must be mqtt://[user:pass@]host[:port] or mqtts://…, "
                          f"got {shown if scheme in ('mqtt', 'mqtts') else scheme + '://…'}")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"{where}: {shown} has a path or query; give only host and port")
    return MqttTarget(parts.hostname, port or (8883 if scheme == "mqtts" else 1883),
                      scheme == "mqtts", unquote(parts.username) if parts.username else None,
                      unquote(parts.password) if parts.password is not None else None)


def node_id(device_id: str) -> str:
    """The device id as Home Assistant's discovery topics allow ([a-zA-Z0-9_-])."""
    return "r2d2voice_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def discovery_configs(device_id: str, *, prefix: str = "homeassistant",
                      privacy: bool = False) -> dict[str, dict[str, Any] | None]:
    """Topic → retained discovery config (None: remove it, the last utterance in privacy
    mode)."""
    base, node = f"r2d2voice/{device_id}", node_id(device_id)
    common: dict[str, Any] = {
        "availability_topic": f"{base}/availability",
        "device": {"identifiers": [node], "name": device_id, "manufacturer": "r2d2voice",
                   "model": "r2d2voice", "sw_version": __version__},
        "origin": {"name": "r2d2voice", "sw_version": __version__},
    }

    def entity(object_id: str, name: str, **config: Any) -> dict[str, Any]:
        return {"name": name, "unique_id": f"{node}_{object_id}", **common, **config}

    configs: dict[str, dict[str, Any] | None] = {
        f"{prefix}/sensor/{node}/state/config": entity(
            "state", "State", state_topic=f"{base}/state", icon="mdi:robot"),
        f"{prefix}/sensor/{node}/last_utterance/config": None if privacy else entity(
            "last_utterance", "Last utterance", state_topic=f"{base}/transcript",
            value_template=f"{{{{ value_json.text[:{_HA_STATE_MAX}] }}}}",
            json_attributes_topic=f"{base}/transcript", icon="mdi:comment-text"),
        f"{prefix}/button/{node}/wake/config": entity(
            "wake", "Wake", command_topic=f"{base}/wake/set", payload_press="PRESS",
            icon="mdi:bell-ring"),
        f"{prefix}/number/{node}/volume/config": entity(
            "volume", "Volume", command_topic=f"{base}/volume/set",
            state_topic=f"{base}/volume", min=0, max=100, step=1, unit_of_measurement="%",
            mode="slider", icon="mdi:volume-high"),
        f"{prefix}/switch/{node}/listening/config": entity(
            "listening", "Listening", command_topic=f"{base}/listening/set",
            state_topic=f"{base}/listening", payload_on="ON", payload_off="OFF",
            icon="mdi:microphone"),
        f"{prefix}/sensor/{node}/cost_today/config": entity(
            "cost_today", "Cost today", state_topic=f"{base}/cost_today",
            device_class="monetary", unit_of_measurement="USD", state_class="total",
            suggested_display_precision=2),
    }
    return configs


class MqttBridge:
    """Follows ``hub`` and keeps the broker up to date until the hub closes (see the module
    docstring). ``rng`` jitters the backoff; ``make_client`` builds paho's client (tests)."""

    def __init__(self, target: MqttTarget, device_id: str, hub: Events, control: RunControl,
                 *, prefix: str = "homeassistant", rng: random.Random | None = None,
                 make_client: Callable[[MqttTarget, str], Any] | None = None,
                 ca_certs: str | None = None) -> None:
        self.target, self.device_id, self.hub, self.control = target, device_id, hub, control
        self.prefix = prefix
        self.base = f"r2d2voice/{device_id}"
        self.rng = rng or random.Random()
        self.make_client = make_client or functools.partial(paho_client, ca_certs=ca_certs)
        self.state = "starting"
        self.cost: float | None = None
        self.connections = 0
        self.failures = 0  # connection attempts in a row that failed
        self.dropped = 0  # moments the bridge could not keep up with
        self.unsent = 0  # transcripts that came while disconnected (or paho's queue was full)
        self.commands_dropped = 0
        self.link: Link | None = None
        self._commands_send, self._commands = trio.open_memory_channel[tuple[str, bytes]](
            COMMANDS_BOUND)

    async def run(self, task_status: trio.TaskStatus[MqttBridge] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Until the hub closes; ``task_status.started(self)`` once it follows the hub."""
        with self.hub.following(_FOLLOWED, bound=EVENTS_BOUND) as sub:
            task_status.started(self)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._connect_forever)
                nursery.start_soon(self._apply_commands)
                async for moment in sub.receive:
                    self.dropped = sub.dropped
                    await self._follow(moment)
                self.dropped = sub.dropped
                await self._offline()
                nursery.cancel_scope.cancel()
        if self.dropped or self.unsent:
            log.info("MQTT: %d events dropped (the bridge was behind), %d utterances not "
                     "published (disconnected)", self.dropped, self.unsent)

    # -- the connection ----------------------------------------------------------------------
    async def _connect_forever(self) -> None:
        """Connect; when that fails or the connection ends, wait (backoff) and again."""
        while True:
            link = Link(self.make_client(self.target, self.device_id), self._on_message)
            self.link = link
            try:
                why = await link.session(self.target.host, self.target.port, self._up)
            except OSError as exc:  # unreachable, refused, a TLS failure (ssl.SSLError)
                why = exc.strerror or str(exc) or type(exc).__name__
            except Exception as exc:  # whatever paho raises: never the conversation's end
                why = f"{type(exc).__name__}: {exc}"
            finally:
                self.link = None
            if link.was_up:
                self.failures = 0
            delay = self.backoff(self.failures)
            self.failures += 1
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "MQTT broker %s: %s; trying again in %.0f s (the conversation goes "
                    "on)", self.target, why, delay)
            await trio.sleep(delay)

    def backoff(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` failed ones in a row: 1 s
        doubling to 60 s, ±20 % jitter."""
        base = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** failures)
        return base * self.rng.uniform(0.8, 1.2)

    def _up(self) -> None:
        """CONNACK: announce ourselves, subscribe, and publish the state as it is."""
        link = self.link
        assert link is not None
        self.connections += 1
        log.info("MQTT connected to %s as %s%s", self.target, self.device_id,
                 "" if self.connections == 1 else " (again)")
        self._announce()
        link.subscribe(f"{self.base}/wake/set", f"{self.base}/volume/set",
                       f"{self.base}/listening/set", f"{self.prefix}/status")
        self._queue_command("cost", b"")  # refreshed once connected

    def _announce(self) -> None:
        for topic, config in discovery_configs(self.device_id, prefix=self.prefix,
                                               privacy=self.hub.privacy).items():
            self._publish(topic, "" if config is None else json.dumps(config), retain=True)
        self._publish(f"{self.base}/availability", "online", retain=True)
        self._publish(f"{self.base}/state", self.state, retain=True)
        self._publish(f"{self.base}/volume", str(self.control.volume), retain=True)
        self._publish(f"{self.base}/listening", "ON" if self.control.listening else "OFF",
                      retain=True)
        if self.cost is not None:
            self._publish(f"{self.base}/cost_today", f"{self.cost:.4f}", retain=True)

    def _publish(self, topic: str, payload: str, *, retain: bool = False) -> bool:
        link = self.link
        return link is not None and link.publish(topic, payload, retain=retain) is not None

    async def _offline(self) -> None:
        """A clean stop: ``offline`` (retained), then DISCONNECT, within CLOSE_S."""
        link = self.link
        if link is None or not link.up:
            return
        with trio.move_on_after(CLOSE_S):
            done = link.publish(f"{self.base}/availability", "offline", retain=True)
            if done is not None:
                await done.wait()
            await link.close(CLOSE_S)

    # -- events out --------------------------------------------------------------------------
    async def _follow(self, moment: Moment) -> None:
        name, data = moment.name, moment.data
        if name in STATES:
            if name != self.state:
                self.state = name
                self._publish(f"{self.base}/state", name, retain=True)
        elif name == "transcript":
            text = json.dumps({"role": data["role"], "text": data["text"]}, ensure_ascii=False)
            if not self._publish(f"{self.base}/transcript", text):
                self.unsent += 1
        else:  # spoken, conversation_ended, budget: a reply was paid for
            self._queue_command("cost", b"")

    def _set_cost(self, spent: object) -> None:
        if isinstance(spent, (int, float)) and spent != self.cost:
            self.cost = float(spent)
            self._publish(f"{self.base}/cost_today", f"{self.cost:.4f}", retain=True)

    # -- commands in -------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == f"{self.prefix}/status":
            if payload.strip().lower() == b"online":
                self._announce()  # Home Assistant restarted: tell it again
            return
        if topic.startswith(self.base + "/") and topic.endswith("/set"):
            self._queue_command(topic[len(self.base) + 1:-4], payload)

    def _queue_command(self, what: str, payload: bytes) -> None:
        try:
            self._commands_send.send_nowait((what, payload))
        except trio.WouldBlock:
            self.commands_dropped += 1
            log.warning("MQTT: command %s dropped (%d waiting already)", what, COMMANDS_BOUND)

    async def _apply_commands(self) -> None:
        async for what, payload in self._commands:
            try:
                await self._apply(what, payload.decode("utf-8", "replace").strip())
            except Exception as exc:  # a command must never end the run
                log.warning("MQTT command %s failed: %r", what, exc)

    async def _apply(self, what: str, value: str) -> None:
        control = self.control
        if what == "wake":
            log.info("MQTT: wake")
            control.wake()
        elif what == "volume":
            try:
                percent = round(float(value))
            except ValueError:
                percent = -1
            if not 0 <= percent <= 100:
                log.warning("MQTT: volume %r is not 0..100: ignored", value[:20])
                return
            await control.set_volume(percent)
            log.info("MQTT: volume %d %%", percent)
            self._publish(f"{self.base}/volume", str(control.volume), retain=True)
        elif what == "listening":
            if value.upper() not in ("ON", "OFF"):
                log.warning("MQTT: listening %r is not ON or OFF: ignored", value[:20])
                return
            await control.set_listening(value.upper() == "ON")
            log.info("MQTT: listening %s", value.upper())
            self._publish(f"{self.base}/listening", "ON" if control.listening else "OFF",
                          retain=True)
            if not control.listening and self.state != OFF:
                self.state = OFF  # until the gate lets a conversation happen again
                self._publish(f"{self.base}/state", OFF, retain=True)
        elif what == "cost":
            self._set_cost(await control.cost_today())
        else:
            log.debug("MQTT: unknown command topic %s/%s/set", self.base, what)


def paho_client(target: MqttTarget, device_id: str, *, ca_certs: str | None = None) -> Any:
    """paho's client for ``target``: MQTT 3.1.1, the will set (``offline``, retained); with
    TLS the broker's certificate and name are checked against ``ca_certs`` (None: the
    system's certificate authorities)."""
    from paho.mqtt import client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                         client_id=f"r2d2voice-{device_id}"[:64], protocol=paho.MQTTv311)
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set(ca_certs=ca_certs)
    client.will_set(f"r2d2voice/{device_id}/availability", "offline", qos=1, retain=True)
    return client
