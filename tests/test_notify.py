"""sd_notify messages arrive on a real AF_UNIX datagram socket, as systemd would receive them."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import pytest
import trio
from support import drain

from r2d2voice.system.notify import Notifier, run_watchdog, watchdog_interval


@pytest.fixture
def path_socket(tmp_path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
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
    assert drain(sock) == [
        "READY=1",
        "STATUS=listening on mic",  # one line: a newline would start a new field
        "WATCHDOG=1",
        "STOPPING=1",
        "ERRNO=5\nSTATUS=bye",
    ]


def test_messages_reach_an_notify_socket(notify_socket, monkeypatch):
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    n = Notifier()
    n.ready(status="connected")
    n.watchdog()
    assert drain(sock) == ["READY=1\nSTATUS=connected", "WATCHDOG=1"]


def test_the_same_status_is_not_sent_twice_in_a_row(path_socket):
    path, sock = path_socket
    n = Notifier(path)
    n.ready(status="a")
    assert not n.status("a")
    assert n.status("b")
    assert not n.status("b")
    assert n.status("a")
    assert drain(sock) == ["READY=1\nSTATUS=a", "STATUS=b", "STATUS=a"]


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


async def test_watchdog_pings_only_while_healthy(path_socket, autojump_clock):
    path, sock = path_socket
    n = Notifier(path)
    healthy = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_watchdog, n, lambda: healthy, 1.0)
        await trio.sleep(3.5)  # checks at 0, 1, 2, 3
        pings_healthy = drain(sock)
        healthy = False
        await trio.sleep(3.0)  # 4, 5, 6
        pings_unhealthy = drain(sock)
        healthy = True
        await trio.sleep(2.0)  # 7, 8
        nursery.cancel_scope.cancel()
    pings_resumed = drain(sock)

    assert pings_healthy == ["WATCHDOG=1"] * 4
    assert pings_unhealthy == []  # a pipeline without capture frames is not vouched for
    assert pings_resumed == ["WATCHDOG=1"] * 2


async def test_pings_stop_while_the_microphone_delivers_nothing(path_socket, autojump_clock,
                                                                caplog):
    """``run``'s watchdog, fed by the microphone's health: a hiccup is tolerated (frames may be
    missing for 5 s), a dead microphone is not; pings come back with the frames."""
    from r2d2voice.appliance.sources import DeviceSource
    from r2d2voice.audio.devices import DeviceInfo

    path, sock = path_socket
    source = DeviceSource(DeviceInfo(0, "mic", "ALSA", 1, 0, 48000.0, True, False))
    microphone_on = True

    async def microphone() -> None:
        """What run_capture does for each 20 ms frame it delivers (here at 5 ms past each
        20 ms step, so no frame ties with a watchdog check)."""
        source.running.set()
        await trio.sleep(0.005)
        while True:
            if microphone_on:
                source.stats.last_frame_time = trio.current_time()
            await trio.sleep(0.02)

    with caplog.at_level(logging.INFO, logger="r2d2voice.system.notify"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(microphone)
            nursery.start_soon(run_watchdog, Notifier(path), source.healthy, 0.5)
            await trio.sleep(3.25)
            assert len(drain(sock)) == 7  # checks at 0, 0.5, ..., 3.0
            microphone_on = False  # the last frame came at 3.245
            await trio.sleep(4.9)
            assert len(drain(sock)) == 10  # 3.5 .. 8.0: up to 5 s without frames is a hiccup
            await trio.sleep(12)
            assert drain(sock) == []  # 8.5 .. 20.0: a dead microphone
            microphone_on = True
            await trio.sleep(1.0)
            assert drain(sock) == ["WATCHDOG=1"] * 2  # 20.5, 21.0
            nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("unhealthy: withholding watchdog pings") == 1
    assert messages.count("healthy again: watchdog pings resumed") == 1
