"""Shipping inside a run (``R2D2_SHIP_URL``): a replay ships its conversation and still
succeeds while the fleet server is down; systemd's ``STATUS=`` shows the shipper while it is
not up to date; the last ship at the end and the way out are bounded (MockClock); bad fleet
settings stop ``replay`` and ``ship`` with exit 3 before anything starts."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from pg import PASSWORD, PgServer
from shipping_support import local_rows, server_rows
from support import SAMPLES, run_cli, statuses

from r2d2voice.appliance.service import ServiceConsole
from r2d2voice.storage.shipping.alongside import ShipPlan, ship_alongside
from r2d2voice.storage.shipping.errors import FleetSchemaTooNew, FleetUnavailable
from r2d2voice.storage.shipping.forever import CLOSE_DEADLINE, ShipStatus
from r2d2voice.storage.shipping.shipper import ShipReport
from r2d2voice.system.notify import Notifier

PLAN = ShipPlan("r2.db", "postgresql://r2d2@fleet.example/fleet", "r2")
DOWN = FleetUnavailable("fleet server fleet.example/fleet unavailable while connecting:"
                        " Connection refused")
TOO_NEW = FleetSchemaTooNew("fleet server fleet.example/fleet has schema version 9")


def shipped(messages: int) -> ShipReport:
    report = ShipReport("fleet.example/fleet", "r2")
    report.rows["messages"] = messages
    return report


def scripted(*steps: ShipReport | Exception,
             calls: list[float] | None = None) -> Callable[[threading.Event], ShipReport]:
    """A shipper returning or raising ``steps`` in turn (and noting when it was called)."""
    outcomes = iter(steps)
    token = trio.lowlevel.current_trio_token()

    def ship(stop: threading.Event) -> ShipReport:
        if calls is not None:
            calls.append(trio.from_thread.run_sync(trio.current_time, trio_token=token))
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return ship


class Watch:
    """The statuses a shipping task reports, awaited one by one: a test waits for the
    shipper's thread this way, never by sleeping (MockClock jumps while a thread runs)."""

    def __init__(self, then: Callable[[ShipStatus], None] | None = None) -> None:
        # at most 100 unread: beyond that send_nowait raises and the test fails
        self.send, self.receive = trio.open_memory_channel[ShipStatus](100)
        self.then = then

    def seen(self, status: ShipStatus) -> None:
        self.send.send_nowait(status)
        if self.then is not None:
            self.then(status)

    async def next(self) -> ShipStatus:
        return await self.receive.receive()


# ------------------------------------------------------------------- a replay that ships


def test_a_replay_ships_its_turns_and_a_server_outage_costs_nothing(
    pg_server: PgServer, db: str, url: str, tmp_path: Path
) -> None:
    path = tmp_path / "r2.db"
    env = {"R2D2_SHIP_URL": url, "R2D2_DEVICE_ID": "r2-hall", "R2D2_DB": str(path)}

    def replay(**extra: str) -> str:
        r = run_cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local",
                    "--out", str(tmp_path / "reply.wav"), cwd=tmp_path, env=env | extra)
        assert r.returncode == 0, r.stderr
        assert PASSWORD not in r.stdout + r.stderr and "Traceback" not in r.stderr
        return r.stderr

    log = replay()
    assert "fleet: up to date on 127.0.0.1:" in log and "as device 'r2-hall'" in log
    on_server = server_rows(pg_server, db, "r2-hall")
    assert on_server == local_rows(path)  # the session's end and latencies included
    assert [m[2] for m in on_server["messages"]].count("assistant") == 2  # both turns

    # the server is down (nothing listens on its port: a refused connection, as when it is
    # stopped; test_shipping_robot/forever stop the real one): the conversation does not mind
    log = replay(R2D2_SHIP_URL=url.replace(f":{pg_server.port}/", ":1/"))
    assert "unavailable while connecting" in log and "not shipped this time" in log
    assert server_rows(pg_server, db, "r2-hall") != local_rows(path)
    r = run_cli("ship", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("shipped 1 session, 4 messages, 2 responses")
    assert server_rows(pg_server, db, "r2-hall") == local_rows(path)


def test_bad_fleet_settings_are_exit_3_before_anything_starts(tmp_path: Path) -> None:
    """Exit 3 from a setting; exit 2 when the command line gave the bad value (--to)."""
    path = tmp_path / "r2.db"
    wav = str(SAMPLES / "hello.wav")
    bad_url = {"R2D2_SHIP_URL": f"postgresql://r2d2:{PASSWORD}@h/db?foo=bar",
               "R2D2_DB": str(path)}
    for args, env, says in (
        (("replay", wav, "--backend", "local"), bad_url, "R2D2_SHIP_URL: invalid"),
        (("replay", wav, "--backend", "local"),
         {"R2D2_SHIP_URL": "postgresql://h/db", "R2D2_DEVICE_ID": "two words"},
         "R2D2_DEVICE_ID: 'two words' is not a device id"),
        (("ship", "--db", str(path)), bad_url, "invalid URI query parameter"),
        (("ship", "--db", str(path), "--to", "mysql://h/db"), {}, "must be a postgresql://"),
    ):
        r = run_cli(*args, cwd=tmp_path, env=env)
        code = 2 if "--to" in args else 3
        assert (r.returncode, r.stdout) == (code, ""), r.stderr
        [line] = r.stderr.splitlines()
        assert says in line and PASSWORD not in line
    assert not path.exists()  # refused before the database was opened
    # the server down is the runtime's failure (exit 1)
    path.write_bytes(b"")
    r = run_cli("ship", "--db", str(path), "--to", "postgresql://r2d2@127.0.0.1:1/fleet",
                cwd=tmp_path)
    assert r.returncode == 1 and "unavailable while connecting" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- STATUS=


async def test_status_shows_the_shipper_while_it_is_not_up_to_date(
        notify_socket: tuple[str, socket.socket],
        thread_clock: trio.testing.MockClock) -> None:
    address, sock = notify_socket
    console = ServiceConsole(Notifier(address))
    console.status("listening")
    ship = scripted(DOWN, DOWN, shipped(4), TOO_NEW)  # t=0, 1, 3 (backoff), 8 (every 5 s)
    watch = Watch(then=console.ship_status)
    async with ship_alongside(PLAN, status=watch.seen, ship=ship, every=5.0):
        await watch.next()
        console.status("speaking")  # the conversation's update keeps the shipper's state
        for _ in range(3):
            await watch.next()
        assert trio.current_time() == 8.0
    assert statuses(sock) == [
        "listening",
        "listening · fleet server unreachable, retrying",
        "speaking · fleet server unreachable, retrying",
        "speaking",  # shipped: the note goes
        "speaking · fleet shipping stopped (see the log)",
    ]


# ------------------------------------------------------------- the last ship, the way out


async def test_finish_ships_at_once_what_was_written_last(
        thread_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    ship = scripted(shipped(5), shipped(3), calls=calls)
    watch = Watch()
    with caplog.at_level(logging.INFO, logger="r2d2voice.storage.shipping"):
        async with ship_alongside(PLAN, status=watch.seen, ship=ship, every=5.0) as shipping:
            assert shipping is not None
            await watch.next()
            await trio.sleep(1)
            status = await shipping.finish()
    assert calls == [0.0, 1.0]  # no wait for the next round
    assert status is not None and (status.state, status.shipped) == ("ok", 8)
    assert "fleet: up to date on fleet.example/fleet as device 'r2' (8 rows shipped)" in [
        r.getMessage() for r in caplog.records]


async def test_finish_with_the_server_down_tries_once_and_lets_the_run_end(
        thread_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    ship = scripted(DOWN, DOWN, DOWN, calls=calls)
    watch = Watch()
    async with ship_alongside(PLAN, status=watch.seen, ship=ship) as shipping:
        assert shipping is not None
        await watch.next()
        await watch.next()
        await trio.sleep(1.5)  # attempts at 0 and 1; the next is due at 3
        status = await shipping.finish()
        done = trio.current_time()
        await trio.sleep(100)  # the task is over: no more attempts
    assert calls == [0.0, 1.0, 2.5] and done == 2.5
    assert status is not None and status.state == "waiting"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{DOWN}; retrying with backoff",
                        "fleet: not shipped this time; the next run or `r2d2voice ship` sends it"]


async def test_finish_waits_at_most_its_deadline_for_a_ship_that_hangs(
        thread_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def hangs(stop: threading.Event) -> ShipReport:
        release.wait(30)
        return shipped(1)

    try:
        async with ship_alongside(PLAN, ship=hangs) as shipping:
            assert shipping is not None
            await trio.sleep(1)
            status = await shipping.finish(deadline=5)
            assert trio.current_time() == 6.0 and status is None
        assert trio.current_time() == 6.0  # the way out does not wait for the thread
    finally:
        release.set()
    assert "fleet: the last ship took over 5 s; the rest ships next time" in [
        r.getMessage() for r in caplog.records]


async def test_a_real_shipper_stuck_on_a_silent_server_closes_within_its_deadline(
        tmp_path: Path, thread_clock: trio.testing.MockClock) -> None:
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    (tmp_path / "r2.db").write_bytes(b"")
    plan = ShipPlan(str(tmp_path / "r2.db"),
                    f"postgresql://r2d2@127.0.0.1:{port}/fleet?connect_timeout=60", "r2")
    states: list[str] = []
    try:
        async with ship_alongside(plan, status=lambda s: states.append(s.state)):
            await trio.sleep(30)  # the connection attempt hangs (up to 60 s of real time)
            leaving = trio.current_time()
        # the way out waited for the batch in flight exactly its deadline, then left it
        assert trio.current_time() - leaving == CLOSE_DEADLINE
    finally:
        silent.close()  # resets the half-open connection: the abandoned thread ends
    assert states == []  # no attempt ended: no verdict was made up


async def test_leaving_without_finish_ships_nothing_more(
        thread_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []
    watch = Watch()
    async with ship_alongside(PLAN, status=watch.seen, ship=scripted(shipped(1), calls=calls),
                              every=5.0):
        await watch.next()
        await trio.sleep(4)
    assert calls == [0.0] and trio.current_time() == 4.0  # a run a signal stopped
    async with ship_alongside(None) as nothing:  # no R2D2_SHIP_URL
        assert nothing is None
