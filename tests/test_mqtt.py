"""MQTT and Home Assistant discovery against a real mosquitto (tests/broker.py): discovery
retained for a late subscriber, availability online → offline (clean stop, and the last will of
a killed process), states in order, utterances exact, commands applied, a broker restart, and
the reconnect backoff on trio's MockClock."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from broker import PASSWORD, Broker, Subscriber
from support import SAMPLES, clean_env

from r2d2voice.appliance.body import RunCommands
from r2d2voice.appliance.gate import AlwaysGate, WakeTrigger
from r2d2voice.appliance.switch import ListeningSwitch
from r2d2voice.appliance.tools.builtins import Volume
from r2d2voice.errors import ConfigError
from r2d2voice.link.state import Quiet
from r2d2voice.system.events import Events
from r2d2voice.system.mqtt import MqttBridge, discovery_configs, paho_client, parse_mqtt_url

DEVICE = "r2-test"
BASE = f"r2d2voice/{DEVICE}"


def test_the_url_is_parsed_and_the_password_never_shown() -> None:
    target = parse_mqtt_url("mqtts://r2d2:p%40ss@ha.local")
    assert (target.host, target.port, target.tls, target.username, target.password) == (
        "ha.local", 8883, True, "r2d2", "p@ss")
    assert str(target) == "mqtts://r2d2@ha.local:8883" and "p@ss" not in repr(target)
    assert parse_mqtt_url("mqtt://10.0.0.2").port == 1883
    for bad in ("http://r2d2:hunter22@ha.local", "mqtt://r2d2:hunter22@ha.local:99999",
                "mqtt://r2d2:hunter22@ha.local/topic"):
        with pytest.raises(ConfigError) as caught:
            parse_mqtt_url(bad)
        assert "hunter22" not in str(caught.value) and "R2D2_MQTT_URL" in str(caught.value)


def test_the_discovery_configs_make_one_device_of_six_entities() -> None:
    configs = discovery_configs("r2.kitchen", prefix="ha")
    assert sorted(configs) == [
        "ha/button/r2d2voice_r2_kitchen/wake/config",
        "ha/number/r2d2voice_r2_kitchen/volume/config",
        "ha/sensor/r2d2voice_r2_kitchen/cost_today/config",
        "ha/sensor/r2d2voice_r2_kitchen/last_utterance/config",
        "ha/sensor/r2d2voice_r2_kitchen/state/config",
        "ha/switch/r2d2voice_r2_kitchen/listening/config"]
    devices = {json.dumps(c["device"]) for c in configs.values() if c}
    assert len(devices) == 1
    assert all(c["availability_topic"] == "r2d2voice/r2.kitchen/availability"
               for c in configs.values() if c)
    assert discovery_configs("r2.kitchen", prefix="ha", privacy=True)[
        "ha/sensor/r2d2voice_r2_kitchen/last_utterance/config"] is None


def _replay(tmp_path: Path, broker: Broker, *extra: str, **settings: str
            ) -> subprocess.Popen[str]:
    env = clean_env(HOME=str(tmp_path),  # the test's own runtime directory (conftest.py)
                    **{"R2D2_MQTT_URL": broker.url(), "R2D2_DEVICE_ID": DEVICE, **settings})
    return subprocess.Popen(
        [sys.executable, "-m", "r2d2voice", "--log-level", "DEBUG", "replay",
         str(SAMPLES / "two_turns.wav"), "--backend", "local", "--db",
         str(tmp_path / "c.db"), *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def test_a_replay_in_the_home_discovery_states_utterances_and_a_clean_stop(
        tmp_path: Path, broker: Broker) -> None:
    watcher = Subscriber(broker, f"{BASE}/#")
    replay = _replay(tmp_path, broker, "--speed", "realtime")
    out, err = replay.communicate(timeout=90)
    assert replay.returncode == 0, err
    watcher.wait_for(lambda m: [x.payload for x in m if x.topic.endswith("availability")]
                     == ["online", "offline"])
    said = [json.loads(p) for p in watcher.on(f"{BASE}/transcript")]
    assert [f"{'you' if s['role'] == 'user' else 'r2'}: {s['text']}" for s in said] == \
        out.splitlines()[:4]
    states = watcher.on(f"{BASE}/state")
    assert states[0] in ("starting", "listening")
    turn = ["user_speaking", "thinking", "speaking"]  # and listening, unless talked over
    assert _contains_in_order(states, [*turn, *turn, "listening"]), states
    assert all(a != b for a, b in itertools.pairwise(states))  # only changes
    watcher.close()
    assert PASSWORD not in out + err

    late = Subscriber(broker, "homeassistant/#", f"{BASE}/#")  # after the run: retained only
    wanted = {*discovery_configs(DEVICE), *(f"{BASE}/{t}" for t in (
        "availability", "state", "volume", "listening", "cost_today"))}
    late.wait_for(lambda m: {x.topic for x in m} >= wanted)
    configs = {m.topic: json.loads(m.payload) for m in late.messages
               if m.topic.endswith("/config")}
    assert set(configs) == set(discovery_configs(DEVICE))
    assert all(m.retain for m in late.messages)
    assert late.on(f"{BASE}/availability") == ["offline"]
    assert late.on(f"{BASE}/state") == ["listening"]
    assert late.on(f"{BASE}/volume") == ["100"] and late.on(f"{BASE}/listening") == ["ON"]
    assert late.on(f"{BASE}/cost_today") == ["0.0000"]  # the local backend bills nothing
    assert late.on(f"{BASE}/transcript") == []  # utterances are not retained
    late.close()


def _contains_in_order(seen: list[str], wanted: list[str]) -> bool:
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


def test_a_killed_run_is_offline_by_its_last_will(tmp_path: Path, broker: Broker) -> None:
    watcher = Subscriber(broker, f"{BASE}/availability")
    replay = _replay(tmp_path, broker, "--speed", "realtime")
    try:
        watcher.wait_for(lambda m: [x.payload for x in m] == ["online"], timeout=60)
        replay.send_signal(signal.SIGKILL)
        replay.wait(10)
        watcher.wait_for(lambda m: [x.payload for x in m] == ["online", "offline"])
    finally:
        if replay.poll() is None:
            replay.kill()
        watcher.close()


@asynccontextmanager
async def bridged(broker: Broker, hub: Events, control: Any,
                  **options: Any) -> AsyncIterator[MqttBridge]:
    async with trio.open_nursery() as nursery:
        bridge = MqttBridge(parse_mqtt_url(broker.url()), DEVICE, hub, control, **options)
        await nursery.start(bridge.run)
        await until(lambda: bridge.connections >= 1)
        yield bridge
        hub.close()


async def until(condition: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def seen(watcher: Subscriber, predicate: Any, timeout: float = 20) -> None:
    await trio.to_thread.run_sync(watcher.wait_for, predicate, timeout)


def control_in(tmp_path: Path) -> tuple[RunCommands, WakeTrigger]:
    trigger = WakeTrigger()
    switch = ListeningSwitch(AlwaysGate(live=True, vad=(0.5, 300, 500), console=Quiet()))
    return RunCommands(Volume(tmp_path / "tool_state.json"), trigger.wake, switch), trigger


async def test_states_and_utterances_go_out_in_order_and_exactly(tmp_path: Path,
                                                                 broker: Broker) -> None:
    watcher = Subscriber(broker, f"{BASE}/state", f"{BASE}/transcript")
    hub = Events()
    control, _ = control_in(tmp_path)
    async with bridged(broker, hub, control):
        for name in ("listening", "user_speaking", "user_stopped", "thinking", "speaking",
                     "speaking", "listening"):
            fields = {"item_id": "i1"} if name == "speaking" else {}
            hub.emit(name, **fields)
        hub.emit("transcript", role="assistant", text='Beep — "boop" ✓ 🤖\nzwei')
        await seen(watcher, lambda m: any(x.topic.endswith("transcript") for x in m))
    assert watcher.on(f"{BASE}/state") == ["starting", "listening", "user_speaking",
                                           "thinking", "speaking", "listening"]
    assert [json.loads(p) for p in watcher.on(f"{BASE}/transcript")] == [
        {"role": "assistant", "text": 'Beep — "boop" ✓ 🤖\nzwei'}]
    watcher.close()


async def test_commands_on_the_set_topics_are_applied(tmp_path: Path, broker: Broker) -> None:
    watcher = Subscriber(broker, f"{BASE}/volume", f"{BASE}/listening")
    control, trigger = control_in(tmp_path)
    async with bridged(broker, Events(), control):
        await seen(watcher, lambda m: len(m) == 2)  # volume 100, listening ON
        for topic, payload in (("volume/set", "loud"), ("volume/set", "25.0"),
                               ("wake/set", "PRESS")):
            await trio.to_thread.run_sync(watcher.publish, f"{BASE}/{topic}", payload)
        await until(lambda: trigger.pending)
        assert trigger.take()
        # switched off, a wake does nothing (commands are applied in order: the volume after
        # it says it was)
        for topic, payload in (("listening/set", "OFF"), ("wake/set", "PRESS"),
                               ("volume/set", "30")):
            await trio.to_thread.run_sync(watcher.publish, f"{BASE}/{topic}", payload)
        await seen(watcher, lambda m: len(m) == 5)
        assert not trigger.pending
    assert watcher.on(f"{BASE}/volume") == ["100", "25", "30"]
    assert watcher.on(f"{BASE}/listening") == ["ON", "OFF"]
    assert control.volume == 30 and not control.listening
    assert json.loads((tmp_path / "tool_state.json").read_text()) == {"volume_percent": 30}
    watcher.close()


async def test_a_broker_restart_mid_run_is_followed_by_everything_again(
        tmp_path: Path, broker: Broker) -> None:
    hub = Events()
    control, _ = control_in(tmp_path)
    async with bridged(broker, hub, control, rng=random.Random(1)) as bridge:
        hub.emit("listening")
        await trio.to_thread.run_sync(broker.stop)  # no persistence: retained ones are gone
        hub.emit("thinking")  # while it is away: the conversation goes on
        hub.emit("transcript", role="user", text="nobody hears this")
        await until(lambda: bridge.failures >= 1)
        await trio.to_thread.run_sync(broker.start)
        await until(lambda: bridge.connections >= 2)
        late = Subscriber(broker, "homeassistant/#", f"{BASE}/#")
        await seen(late, lambda m: len([x for x in m if x.topic.endswith("/config")]) == 6
                   and any(x.topic == f"{BASE}/state" for x in m))
        assert late.on(f"{BASE}/state") == ["thinking"]
        assert late.on(f"{BASE}/availability") == ["online"]
    assert bridge.unsent == 1
    await seen(late, lambda m: late.on(f"{BASE}/availability")[-1:] == ["offline"])
    late.close()


async def test_privacy_mode_publishes_no_utterance_and_removes_its_sensor(
        tmp_path: Path, broker: Broker) -> None:
    watcher = Subscriber(broker, "homeassistant/sensor/#", f"{BASE}/transcript")
    hub = Events(privacy=True)
    control, _ = control_in(tmp_path)
    async with bridged(broker, hub, control):
        hub.emit("transcript", role="user", text="my secret")
        await seen(watcher, lambda m: len(m) >= 3)
    await trio.sleep(0.2)
    assert watcher.on(f"{BASE}/transcript") == []
    removed = watcher.on("homeassistant/sensor/r2d2voice_r2-test/last_utterance/config")
    assert removed in ([], [""])  # an empty retained config removes the entity
    watcher.close()


async def test_the_reconnect_backoff_doubles_to_a_minute(thread_clock: trio.testing.MockClock,
                                                         ) -> None:
    """No broker on the port: each attempt fails at once; the waits between them (trio's
    clock) double from 1 s to 60 s, ±20 %."""
    attempts: list[float] = []
    enough = trio.Event()

    def make_client(target: Any, device_id: str) -> Any:
        attempts.append(trio.current_time())
        if len(attempts) == 9:
            enough.set()
        return paho_client(target, device_id)

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    hub = Events()
    bridge = MqttBridge(parse_mqtt_url(f"mqtt://127.0.0.1:{port}"), DEVICE, hub,
                        control_in(Path("/nonexistent"))[0], rng=random.Random(7),
                        make_client=make_client)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        # no deadline on trio's clock (the clock would jump to it while a connect runs in its
        # thread on a loaded machine): a guard on the real one
        token = trio.lowlevel.current_trio_token()
        guard = threading.Timer(120, lambda: trio.from_thread.run_sync(
            enough.set, trio_token=token))
        guard.start()
        await enough.wait()
        guard.cancel()
        hub.close()
    assert len(attempts) >= 9, attempts
    waits = [b - a for a, b in itertools.pairwise(attempts)][:8]
    for k, wait in enumerate(waits):
        base = min(60.0, 2.0 ** k)
        assert 0.8 * base <= wait <= 1.2 * base + 0.6, (k, waits)
    assert bridge.connections == 0



@pytest.mark.parametrize("broker", ["tls"], indirect=True)
def test_mqtts_checks_the_brokers_certificate_against_r2d2_mqtt_ca(
        tmp_path: Path, broker: Broker) -> None:
    """A broker with a certificate of a CA of one's own (openssl, throw-away): with
    ``R2D2_MQTT_CA`` the replay is in the home over TLS; without it the certificate is refused
    (the system's CAs never signed it), said once, and the conversation goes on all the same;
    a CA file that is not one is a configuration error before anything starts."""
    watcher = Subscriber(broker, f"{BASE}/availability", f"{BASE}/state")  # the plain listener
    env = {"R2D2_MQTT_URL": broker.tls_url(), "R2D2_MQTT_CA": str(broker.ca)}
    trusted = _replay(tmp_path, broker, **env)
    out, err = trusted.communicate(timeout=90)
    assert trusted.returncode == 0, err
    watcher.wait_for(lambda m: [x.payload for x in m if x.topic.endswith("availability")]
                     == ["online", "offline"])
    assert "listening" in watcher.on(f"{BASE}/state")
    assert f"MQTT connected to mqtts://r2d2@localhost:{broker.tls_port}" in err
    watcher.close()

    untrusted = _replay(tmp_path, broker, R2D2_MQTT_URL=broker.tls_url())
    out, err = untrusted.communicate(timeout=90)
    assert untrusted.returncode == 0, err
    assert "turns answered" in out or "turn answered" in out
    refused = [line for line in err.splitlines() if "certificate verify failed" in line]
    assert refused and "(the conversation goes on)" in refused[0]
    assert "MQTT connected" not in err and PASSWORD not in out + err

    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    bad = _replay(tmp_path, broker, **{**env, "R2D2_MQTT_CA": str(tmp_path / "not-a-ca.pem")})
    out, err = bad.communicate(timeout=60)
    assert bad.returncode == 3
    assert err.startswith(f"r2d2voice: error: R2D2_MQTT_CA {tmp_path / 'not-a-ca.pem'}: not a "
                          "readable PEM file of CA certificates")
    assert len(err.splitlines()) == 1
