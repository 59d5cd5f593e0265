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


def make_certificates(root: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate it signed for ``localhost`` / 127.0.0.1
    (openssl); (CA certificate, server certificate, server key)."""
    ca_key, ca, key, csr, cert = (root / n for n in (
        "ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    sans = root / "san.cnf"
    sans.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
            str(ca), "-days", "2", "-subj", "/CN=r2d2voice test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(sans))
    for path in (ca, cert, key):
        path.chmod(0o644)  # as root, mosquitto reads them as the mosquitto user
    return ca, cert, key


class Broker:
    """A running mosquitto; :meth:`stop` and :meth:`start` again keep the port. With ``tls``
    a second listener, ``tls_port``, speaks TLS with a certificate of :attr:`ca`'s."""

    host = "127.0.0.1"

    def __init__(self, binary: str, root: Path, *, tls: bool = False) -> None:
        self.binary = binary
        self.root = root
        self.port = _free_port()
        self.tls_port = _free_port() if tls else None
        self.ca: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        root.chmod(0o755)  # as root, mosquitto reads its files as the mosquitto user
        passwords = root / "passwords"
        passwords.write_text("")
        subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b",
                        str(passwords), USER, PASSWORD], check=True, capture_output=True)
        passwords.chmod(0o644)
        self.config = root / "mosquitto.conf"
        listeners = f"listener {self.port} 127.0.0.1\n"
        if self.tls_port is not None:
            self.ca, cert, key = make_certificates(root)
            listeners += (f"listener {self.tls_port} 127.0.0.1\ncertfile {cert}\n"
                          f"keyfile {key}\n")
        self.config.write_text(
            f"{listeners}password_file {passwords}\nallow_anonymous false\n"
            "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n")
        self.config.chmod(0o644)

    def url(self, *, password: str = PASSWORD) -> str:
        return f"mqtt://{USER}:{password}@{self.host}:{self.port}"

    def tls_url(self, *, host: str = "localhost") -> str:
        """``mqtts://`` on the TLS listener, by the name its certificate has."""
        assert self.tls_port is not None
        return f"mqtts://{USER}:{PASSWORD}@{host}:{self.tls_port}"

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
