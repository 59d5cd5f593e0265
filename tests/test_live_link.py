"""The link driving the GPT-Live core, on trio's MockClock: the whole pipeline (the microphone
chain, the supervisor, a connection's tasks) against the local backend's Live mode over an
in-memory websocket, and against a scripted peer for what the local backend never does (a
slow ``session.started``, a ``session.close`` nobody answers)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from fake_service import MemorySessions, fast
from livecheck import check_client, closed, started
from local_link import CFG, LocalLink, inline_threads, talk
from memory_transport import memory_pair

from r2d2voice.appliance.endpoints import LIVE, Service
from r2d2voice.appliance.protocols import core_factory
from r2d2voice.link.connection import GOODBYE_DEADLINE
from r2d2voice.link.transport import Endpoint, LinkClosed, Transport
from r2d2voice.localbackend.fault_options import parse_faults
from r2d2voice.protocol.actions import StoreMessage, StoreUsage
from r2d2voice.system.config import Settings

LIVE_CORE = core_factory(Service("live", "gpt-live-1", None, LIVE, "marin"), Settings(db="x"))
LIVE_PATH = "/v1/live/sessions"


@pytest.fixture(autouse=True)
def _inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    inline_threads(monkeypatch)


def said(sessions: MemorySessions) -> list[tuple[str, str]]:
    return [(m.role, m.text) for _, m in sessions.messages()]


async def test_a_live_conversation_through_the_link(autojump_clock: Any) -> None:
    link = LocalLink(path=LIVE_PATH, realtime_factor=1.0)
    result, sessions = await talk(link, fast(1.0, 1.0, 1.5, 1.0), protocol=LIVE_CORE)
    events = [e for _, e in link.events]
    for event in events:
        check_client(event)
    assert events[0]["type"] == "session.start" and "input" not in events[0]["session"]
    assert events[-1]["type"] == "session.close"  # our close: answered with the usage
    assert [r for r, _ in said(sessions)] == ["user", "assistant", "user", "assistant"]
    assert [t for r, t in said(sessions) if r == "user"] == ["(speech, 1.0 s)",
                                                              "(speech, 1.5 s)"]
    usage = [a for _, a in sessions.records if isinstance(a, StoreUsage)]
    assert usage[-1].final and usage[-1].seconds == max(u.seconds for u in usage) > 0
    assert result.stats.assistant_turns == 2 and result.stats.user_turns == 2


async def test_an_expired_live_session_is_replaced_at_once_and_seeded(
        autojump_clock: Any) -> None:
    link = LocalLink(path=LIVE_PATH, realtime_factor=1.0,
                     faults=parse_faults(["live_close=expired:1"]))
    _, sessions = await talk(link, fast(1.0, 1.0, 1.5, 1.0), protocol=LIVE_CORE)
    starts = link.of_type("session.start")
    assert len(starts) >= 2
    first_session = [(m.role, m.text) for sid, m in sessions.messages() if sid == "s0"]
    seeded = [(i["role"], i["content"][0]["text"]) for i in starts[1]["session"]["input"]]
    assert seeded == first_session and len(first_session) == 2
    assert sessions.rows["s1"]["previous"] == "s0"
    # expired: at once, not after a backoff
    assert link.opened[1] - link.opened[0] < 2.0


# -- a scripted peer ----------------------------------------------------------------------------


class Peer:
    """A Live service that starts the session after ``start_delay`` and, if ``answers``,
    answers ``session.close``; it records (time, event) of what it received."""

    def __init__(self, *, start_delay: float = 0.0, answers: bool = True) -> None:
        self.start_delay = start_delay
        self.answers = answers
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.closed_at: float | None = None
        self.started_at: float | None = None

    @asynccontextmanager
    async def connect(self, endpoint: Endpoint) -> AsyncIterator[Transport]:
        client, server = memory_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve, server)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()

    async def _serve(self, t: Any) -> None:
        try:
            while True:
                event = json.loads(await t.receive())
                self.events.append((trio.current_time(), event))
                if event["type"] == "session.start":
                    await trio.sleep(self.start_delay)
                    await t.send(started())
                    self.started_at = trio.current_time()
                elif event["type"] == "session.close" and self.answers:
                    await t.send(closed("close_requested", seconds=4))
                    await t.aclose(1000)
        except LinkClosed:
            self.closed_at = trio.current_time()

    def types(self) -> list[str]:
        return [e["type"] for _, e in self.events]


async def test_no_audio_goes_before_the_session_started(autojump_clock: Any) -> None:
    peer = Peer(start_delay=2.0)
    sessions = MemorySessions()
    await talk(peer, fast(0.1, 0.5), protocol=LIVE_CORE, sessions=sessions)  # type: ignore[arg-type]
    types = peer.types()
    assert types[0] == "session.start" and types[-1] == "session.close"
    assert set(types[1:-1]) == {"session.input_audio.append"}
    first_audio = next(at for at, e in peer.events if e["type"] != "session.start")
    assert peer.started_at is not None and first_audio >= peer.started_at
    usage = [a for _, a in sessions.records if isinstance(a, StoreUsage)]
    assert usage == [StoreUsage("sess_live_1", 4, final=True)]  # the close's answer is kept


async def test_a_close_nobody_answers_is_given_up_after_its_deadline(
        autojump_clock: Any) -> None:
    peer = Peer(answers=False)
    with trio.fail_after(30):
        _, sessions = await talk(peer, fast(0.1, 0.5), protocol=LIVE_CORE)  # type: ignore[arg-type]
    asked = next(at for at, e in peer.events if e["type"] == "session.close")
    assert peer.closed_at is not None
    assert GOODBYE_DEADLINE <= peer.closed_at - asked < GOODBYE_DEADLINE + 0.5
    assert not [m for _, m in sessions.records if isinstance(m, StoreMessage)]


def test_the_live_core_is_built_from_the_session_config_and_the_context() -> None:
    from r2d2voice.realtime.client_events import SessionConfig

    tool = {"type": "function", "name": "turn_head", "parameters": {"type": "object"}}
    core = LIVE_CORE(SessionConfig(instructions="Be R2.", tools=(tool,)),
                     (("user", "My name is Ana."), ("assistant", "Hello Ana!"), ("user", " ")))
    start = check_client(core.opening()[0])
    assert start.session.model == "gpt-live-1" and start.session.instructions == "Be R2."
    assert start.session.audio.output.voice == "marin"
    assert [t.name for t in start.session.delegation.responses.tools] == ["turn_head"]
    assert [(i.role, i.content[0].text) for i in start.session.input] == [
        ("user", "My name is Ana."), ("assistant", "Hello Ana!")]  # empty turns left out
    assert core_factory(Service("openai", "m", None), Settings(db="x"))(CFG, ()).tick_interval \
        is None


async def test_a_delegated_tool_call_runs_through_the_link_and_its_output_goes_back(
        autojump_clock: Any) -> None:
    """Responses delegation: the hosted model's call comes in ``response.event``, the run's
    tool runner runs it (audited as with Realtime), the output goes back and is said."""
    from dataclasses import replace

    from r2d2voice.appliance.tools import Toolbox
    from r2d2voice.localbackend.script import Script, ScriptTurn
    from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

    toolbox = Toolbox(("get_time", "set_volume", "end_conversation"))
    link = LocalLink(path=LIVE_PATH, realtime_factor=1.0, script=Script((
        ScriptTurn(say="Quieter.", call="set_volume", arguments='{"percent": 50}'),)))
    config = replace(CFG, tools=tuple(toolbox.session_tools()))
    result, sessions = await talk(link, fast(1.0, 2.5), config=config, toolbox=toolbox,
                                  protocol=LIVE_CORE)
    [start] = link.of_type("session.start")
    assert start["session"]["delegation"]["type"] == "responses"
    [call] = [a for _, a in sessions.records if isinstance(a, StoreToolCall)]
    assert (call.name, json.loads(call.arguments)) == ("set_volume", {"percent": 50})
    [done] = [a for _, a in sessions.records if isinstance(a, StoreToolResult)]
    assert (done.call_id, done.status, done.output) == (call.call_id, "ok", "volume set to 50 %")
    [item] = link.of_type("response.item.create")
    assert item["item"] == {"type": "function_call_output", "call_id": call.call_id,
                            "output": "volume set to 50 %"}
    assert len(link.of_type("response.create")) == 1
    robot = [t for r, t in said(sessions) if r == "assistant"]
    assert any("volume set to 50 %" in t for t in robot), robot
    assert result.stats.tool_calls == 1
