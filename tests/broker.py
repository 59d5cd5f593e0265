"""A throw-away mosquitto broker for the tests, on a free loopback port, and a subscriber.

Each test that needs one gets its own (``tests/conftest.py``: the fixture ``broker``): Debian's
``mosquitto`` started with a config of ours — one listener on 127.0.0.1, no persistence (a
restart forgets retained messages: whatever the bridge shows after one it published again),
a password file (user ``r2d2``), log to stderr. Without the binary the fixture skips with the
reason; under ``CI=true`` it fails instead (``.ci/install`` installs the ``mosquitto`` package).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "r2d2"
PASSWORD = "Mq77-s3cret:pw"  # distinctive, so a test can tell it never leaks


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: mosquitto must run in CI)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A running mosquitto; :meth:`stop` and :meth:`start` again keep the port."""

    host = "127.0.0.1"

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.chmod(0o755)  # as root, mosquitto reads its files as the mosquitto user
        passwords = root / "passwords"
        passwords.write_text("")
        subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b",
                        str(passwords), USER, PASSWORD], check=True, capture_output=True)
        passwords.chmod(0o644)
        self.config = root / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"password_file {passwords}\nallow_anonymous false\n"
            "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n")
        self.config.chmod(0o644)

    def url(self, *, password: str = PASSWORD) -> str:
        return f"mqtt://{USER}:{password}@{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.host, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    retain: bool


class Subscriber:
    """A paho client in its own thread, recording every message of ``topics`` in order."""

    def __init__(self, broker: Broker, *topics: str) -> None:
        from paho.mqtt import client as paho

        self.messages: list[Message] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.username_pw_set(USER, PASSWORD)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the subscriber could not subscribe")

    def _on_message(self, _client: object, _userdata: object, message: object) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, message.payload.decode(),  # type: ignore[attr-defined]
                                         bool(message.retain)))  # type: ignore[attr-defined]
            self._lock.notify_all()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 20) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(f"not seen in {timeout} s; got {self.messages}")

    def on(self, topic: str) -> list[str]:
        with self._lock:
            return [m.payload for m in self.messages if m.topic == topic]

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
