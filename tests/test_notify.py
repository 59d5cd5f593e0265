"""sd_notify messages arrive on a real AF_UNIX datagram socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import trio

from r2d2voice.system.notify import Notifier, run_watchdog, watchdog_interval


def _drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket(tmp_path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"r2d2voice-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    yield "@" + name, sock
    sock.close()


def test_messages_reach_a_path_socket(path_socket, monkeypatch):
    path, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.enabled
    assert n.ready()
    assert n.status("listening  on\nmic")
    assert n.watchdog()
    assert n.stopping()
    assert n.notify(ERRNO=5, STATUS="bye")
    assert _drain(sock) == [
        "READY=1",
        "STATUS=listening on mic",  # one line: a newline would start a new field
        "WATCHDOG=1",
        "STOPPING=1",
        "ERRNO=5\nSTATUS=bye",
    ]


def test_messages_reach_an_abstract_socket(abstract_socket, monkeypatch):
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    n = Notifier()
    n.ready(status="connected")
    n.watchdog()
    assert _drain(sock) == ["READY=1\nSTATUS=connected", "WATCHDOG=1"]


def test_the_same_status_is_not_sent_twice_in_a_row(path_socket):
    path, sock = path_socket
    n = Notifier(path)
    n.ready(status="a")
    assert not n.status("a")
    assert n.status("b")
    assert not n.status("b")
    assert n.status("a")
    assert _drain(sock) == ["READY=1\nSTATUS=a", "STATUS=b", "STATUS=a"]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready()
    assert not n.status("x")
    assert not n.watchdog()
    assert not n.stopping()


def test_a_vanished_socket_is_not_an_error(tmp_path):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.enabled
    assert not n.ready()  # ENOENT: logged at debug level, not raised


def test_watchdog_interval_from_environment():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_only_while_healthy(path_socket):
    path, sock = path_socket
    n = Notifier(path)
    answers: list[bool] = []
    healthy = True

    def is_healthy() -> bool:
        answers.append(healthy)
        return healthy

    async def wait_for_checks(count: int) -> None:
        target = len(answers) + count
        while len(answers) < target:
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_watchdog, n, is_healthy, 0.01)
        await wait_for_checks(4)
        pings_healthy = _drain(sock)
        healthy = False
        await wait_for_checks(4)
        pings_unhealthy = _drain(sock)
        healthy = True
        await wait_for_checks(3)
        nursery.cancel_scope.cancel()
    pings_resumed = _drain(sock)

    assert set(pings_healthy + pings_resumed) == {"WATCHDOG=1"}
    assert pings_unhealthy == []  # a pipeline without capture frames is not vouched for
    assert len(pings_healthy) + len(pings_resumed) == answers.count(True)
    assert len(pings_resumed) >= 3
