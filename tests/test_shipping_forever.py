"""``ship_forever``, the shipping task of ``run``: backoff while the server is down (MockClock,
an injected shipper), a stop for good on a newer server schema, prompt cancellation with the
event loop never blocked; and, against the real server, nothing lost across an outage."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from pg import PgServer
from shipping_support import converse, local_rows, server_rows

from r2d2voice.errors import ConfigError, UsageError
from r2d2voice.storage.database import Store
from r2d2voice.storage.pending import Backoff
from r2d2voice.storage.shipping.errors import FleetSchemaTooNew, FleetUnavailable
from r2d2voice.storage.shipping.forever import ShipStatus, ship_forever
from r2d2voice.storage.shipping.shipper import ShipReport

URL = "postgresql://r2d2@fleet.example/fleet"
Step = Callable[[threading.Event], ShipReport]


def shipped(messages: int) -> ShipReport:
    report = ShipReport("fleet.example/fleet", "r2")
    report.rows["messages"] = messages
    return report


def scripted(*steps: ShipReport | Exception) -> Step:
    """A shipper that returns or raises the given outcomes, one per call."""
    outcomes: Iterator[ShipReport | Exception] = iter(steps)

    def ship(stop: threading.Event) -> ShipReport:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return ship


TOO_NEW = FleetSchemaTooNew("fleet server fleet.example/fleet has schema version 9, newer"
                            " than this r2d2voice understands (2); upgrade r2d2voice")


async def test_retries_back_off_while_the_server_is_down_and_stop_on_a_newer_schema(
    thread_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    down = FleetUnavailable("fleet server fleet.example/fleet unavailable while connecting:"
                            " Connection refused")
    seen: list[tuple[float, str, float | None, int]] = []

    def status(state: ShipStatus) -> None:
        seen.append((trio.current_time(), state.state, state.retry_in, state.shipped))

    ship = scripted(down, down, down, down, shipped(40), shipped(2), down, shipped(0), TOO_NEW)
    error = await ship_forever("r2.db", URL, "r2", status=status, ship=ship, every=5.0)
    assert error is TOO_NEW
    assert seen == [
        (0.0, "waiting", 1.0, 0), (1.0, "waiting", 2.0, 0), (3.0, "waiting", 4.0, 0),
        (7.0, "waiting", 8.0, 0), (15.0, "ok", None, 40), (20.0, "ok", None, 42),
        (25.0, "waiting", 1.0, 42),  # a success reset the backoff
        (26.0, "ok", None, 42), (31.0, "stopped", None, 42)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"{down}; retrying with backoff"] * 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"shipping stopped: {TOO_NEW}"]


async def test_an_unexpected_failure_is_logged_once_and_retried(
    thread_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[str] = []
    bug = ValueError("a bug")
    ship = scripted(bug, bug, shipped(3), TOO_NEW)
    await ship_forever("r2.db", URL, "r2", status=lambda s: states.append(str(s)), ship=ship,
                       backoff=Backoff(first=0.5, cap=0.5))
    assert states == ["fleet: ValueError: a bug; retrying in 0.5 s"] * 2 + [
        "fleet: up to date (3 rows shipped)", f"fleet: shipping stopped: {TOO_NEW}"]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unexpectedly" in tracebacks[0].getMessage()


async def test_settings_no_retry_can_fix_stop_shipping_without_ending_the_run(
    thread_clock: trio.testing.MockClock,
) -> None:
    states: list[str] = []
    bad_url = await ship_forever("r2.db", "postgresql://h/db?foo=bar", "r2",
                                 status=lambda s: states.append(str(s)))
    assert isinstance(bad_url, UsageError) and "invalid URI query parameter" in str(bad_url)
    bad_id = await ship_forever("r2.db", URL, "two words")
    assert isinstance(bad_id, ConfigError) and "R2D2_DEVICE_ID" in str(bad_id)
    assert states == [f"fleet: shipping stopped: {bad_url}"]
    assert trio.current_time() == 0.0


async def test_cancellation_is_prompt_and_the_loop_never_waits_for_the_thread(
    thread_clock: trio.testing.MockClock,
) -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    stop_seen: list[bool] = []

    def slow_ship(stop: threading.Event) -> ShipReport:  # a server that does not answer
        started.set()
        release.wait(30)
        stop_seen.append(stop.is_set())
        finished.set()
        return shipped(1)

    ticks = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(ship_forever, "r2.db", URL, "r2", ship=slow_ship))
        await trio.to_thread.run_sync(started.wait)
        for _ in range(3):  # the conversation goes on while the ship is stuck
            await trio.sleep(1)
            ticks += 1
        before = trio.current_time()
        nursery.cancel_scope.cancel()
    assert ticks == 3 and not release.is_set()
    assert trio.current_time() == before  # cancelled without waiting for the thread
    release.set()
    await trio.to_thread.run_sync(finished.wait)
    assert stop_seen == [True]  # the abandoned thread was told to stop after its batch


def write_more(path: Path) -> None:
    with Store.open(path) as store:
        converse(store, word="during the outage")


async def test_an_outage_loses_nothing_and_shipping_resumes(pg_server: PgServer, db: str,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store)
    states: list[ShipStatus] = []

    def status(state: ShipStatus) -> None:
        states.append(state)

    async def until(predicate: Callable[[ShipStatus], bool]) -> ShipStatus:
        while not (states and predicate(states[-1])):
            await trio.sleep(0.01)
        return states[-1]

    with trio.fail_after(30):  # a bound, not a timing claim
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                ship_forever, path, pg_server.url(db), "r2", status=status, every=0.02,
                backoff=Backoff(first=0.02, cap=0.1)))
            await until(lambda s: s.state == "ok" and s.shipped == 9)
            await trio.to_thread.run_sync(pg_server.stop)
            await trio.to_thread.run_sync(write_more, path)
            down = await until(lambda s: s.state == "waiting")
            assert "unavailable" in str(down)
            await trio.to_thread.run_sync(pg_server.start)
            await until(lambda s: s.state == "ok" and s.shipped == 18)
            nursery.cancel_scope.cancel()
    assert server_rows(pg_server, db, "r2") == local_rows(path)
