"""Reconnect policy on a MockClock: the backoff schedule and its jitter, a healthy session
resetting it, refused and lost connections, fatal service errors. In-memory transport and a
scripted service: milliseconds of wall time."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from fake_service import FakeService, MemorySessions, NullSink, Script, speech
from local_link import run_conversation

from r2d2voice.appliance.sources import FileSource, VadParams
from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.link.state import LinkPolicy
from r2d2voice.link.supervisor import Backoff
from r2d2voice.link.transport import Endpoint, Transport
from r2d2voice.protocol.actions import StoreError
from r2d2voice.realtime.client_events import SessionConfig

CFG = SessionConfig(instructions="x")
ENDPOINT = Endpoint("mem://fake", "m")


class Top(random.Random):
    """Jitter always at its top (x1.0 is never drawn; 0.999… is close enough to compare)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_from_initial_and_caps_at_max() -> None:
    backoff = Backoff(LinkPolicy(backoff_initial=0.5, backoff_max=4.0), Top())
    assert backoff.delay() == 0.0  # no failure yet: connect at once
    delays = []
    for _ in range(6):
        backoff.failed()
        delays.append(backoff.delay())
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.delay() == 0.0


def test_backoff_jitter_comes_from_the_injected_rng_and_stays_in_range() -> None:
    policy = LinkPolicy(backoff_initial=1.0, backoff_max=30.0)
    one, two = Backoff(policy, random.Random(7)), Backoff(policy, random.Random(7))
    seen = []
    for n in range(8):
        one.failed()
        two.failed()
        d = one.delay()
        assert d == two.delay()  # same seed, same schedule
        base = min(30.0, 2.0 ** n)
        assert 0.5 * base <= d <= base
        seen.append(d / base)
    assert len(set(seen)) == len(seen)  # really jittered


def test_a_healthy_session_counts_its_loss_as_the_first_failure() -> None:
    backoff = Backoff(LinkPolicy(backoff_initial=0.5, healthy_after=20.0), Top())
    for _ in range(4):
        backoff.failed(lived=3.0)  # short-lived sessions: growing delays
    assert backoff.delay() == 4.0
    backoff.failed(lived=25.0)  # one that lived long enough: back to the start
    assert backoff.delay() == 0.5


def counting(service: FakeService, times: list[float]):
    @asynccontextmanager
    async def connect(endpoint: Endpoint) -> AsyncIterator[Transport]:
        times.append(trio.current_time())
        async with service.connect(endpoint) as transport:
            yield transport

    return connect


async def test_refused_connections_are_retried_on_the_backoff_schedule(autojump_clock) -> None:
    service = FakeService(Script(refuse_first=3))
    sessions = MemorySessions()
    times: list[float] = []
    policy = LinkPolicy(backoff_initial=0.5, backoff_max=30.0)
    ctx = await run_conversation(
        ENDPOINT, CFG, FileSource(speech(1.0, 1.0), realtime=False, vad=VadParams()),
        NullSink(), sessions, sessions.record, policy=policy, rng=random.Random(3),
        connect=counting(service, times))
    expected = Backoff(policy, random.Random(3))
    gaps = []
    for _ in range(3):
        expected.failed()
        gaps.append(expected.delay())
    # each attempt waits out its delay (a refusal itself takes 10 ms of the fake's time)
    assert [round(b - a - 0.01, 6) for a, b in itertools.pairwise(times)] == \
        [round(g, 6) for g in gaps]
    assert service.connections == 1 and sessions.roles() == ["user", "assistant"]
    assert ctx.stats.reconnects == 0  # nothing was lost: it never connected before


async def test_without_reconnect_a_lost_link_fails_after_storing_what_was_said(
    autojump_clock
) -> None:
    service = FakeService(Script(drop_after=1, drop="close"))
    sessions = MemorySessions()
    with pytest.raises(RuntimeFailure, match=r"lost \(close code 1011\)"):
        await run_conversation(
            ENDPOINT, CFG, FileSource(speech(1.0, 1.0, 1.0), realtime=False, vad=VadParams()),
            NullSink(), sessions, sessions.record, policy=LinkPolicy(reconnect=False),
            connect=service.connect)
    assert service.connections == 1
    assert sessions.roles() == ["user", "assistant"]
    assert [e.type for e in sessions.of_type(StoreError)] == ["connection_lost"]
    assert "stats" in sessions.rows["s0"]  # the session was closed


@pytest.mark.parametrize("code", ["insufficient_quota", "invalid_api_key",
                                  "billing_hard_limit_reached", "model_not_found"])
async def test_fatal_service_errors_end_the_run_after_one_try(autojump_clock, code: str) -> None:
    service = FakeService(Script(fatal_code=code))
    sessions = MemorySessions()
    with pytest.raises(ConfigError, match=f"The service says {code}"):
        await run_conversation(
            ENDPOINT, CFG, FileSource(speech(1.0, 1.0), realtime=False, vad=VadParams()),
            NullSink(), sessions, sessions.record, connect=service.connect)
    assert service.attempts == 1
    errors = sessions.of_type(StoreError)
    assert [(e.code, e.fatal) for e in errors] == [(code, True)]


async def test_a_rejected_key_is_not_retried(autojump_clock) -> None:
    attempts = 0

    @asynccontextmanager
    async def rejecting(endpoint: Endpoint) -> AsyncIterator[Transport]:
        nonlocal attempts
        attempts += 1
        raise ConfigError("the Realtime service rejected the API key (HTTP 401)")
        yield  # pragma: no cover

    sessions = MemorySessions()
    with pytest.raises(ConfigError, match="rejected the API key"):
        await run_conversation(
            ENDPOINT, CFG, FileSource(speech(1.0, 1.0), realtime=False, vad=VadParams()),
            NullSink(), sessions, sessions.record, connect=rejecting)
    assert attempts == 1 and not sessions.rows


async def test_a_run_that_never_connects_gives_up_when_told_to(autojump_clock) -> None:
    """A replay (give_up_connecting=15) whose service never answers stops trying after 15 s
    with one line saying why; a run of the robot (no limit) keeps trying."""
    attempts: list[float] = []

    @asynccontextmanager
    async def refused(endpoint: Endpoint) -> AsyncIterator[Transport]:
        attempts.append(trio.current_time())
        await trio.sleep(0.01)
        raise RuntimeFailure("cannot connect to 127.0.0.1:1: connection refused")
        yield  # pragma: no cover

    sessions = MemorySessions()
    with pytest.raises(RuntimeFailure) as failed:
        await run_conversation(
            ENDPOINT, CFG, FileSource(speech(1.0, 1.0), realtime=False, vad=VadParams()),
            NullSink(), sessions, sessions.record, connect=refused, rng=random.Random(0),
            policy=LinkPolicy(give_up_connecting=15.0))
    assert str(failed.value).startswith("could not connect to mem://fake in 15 s of trying")
    assert "connection refused" in str(failed.value) and "nothing was sent" in str(failed.value)
    assert 15.0 <= trio.current_time() < 15.5 and len(attempts) >= 5
    assert not sessions.rows  # no session was ever begun

    attempts.clear()
    with trio.move_on_after(120):  # no limit: still trying two minutes on
        await run_conversation(
            ENDPOINT, CFG, FileSource(speech(1.0, 1.0), realtime=False, vad=VadParams()),
            NullSink(), MemorySessions(), sessions.record, connect=refused,
            rng=random.Random(0))
    assert attempts[-1] - attempts[0] > 90
