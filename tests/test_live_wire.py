"""GPT-Live over a real websocket: the Live core in a small trio client talking to the local
backend's ``/v1/live/sessions`` on loopback. Every client event the backend receives is checked
against the SDK's ``ClientEvent`` (strictly), every server event the client receives against
``ServerEvent``; then the record, the audio, the usage and each fault's end."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio
import trio_websocket
from livecheck import check_client, check_server
from support import local_backend, silence, tone

from r2d2voice.live.client_events import LiveConfig, SessionClose
from r2d2voice.live.conversation import LiveConversation
from r2d2voice.localbackend.fault_options import parse_faults
from r2d2voice.protocol.actions import Play, Send, StoreError, StoreMessage, StoreUsage
from r2d2voice.protocol.core import TICK_S, End

FAST = 50.0  # replies stream 50x faster than real time
FRAME = 480
CONFIG = LiveConfig(instructions="Be R2.")


def turn(speech_s: float) -> np.ndarray:
    return np.concatenate([silence(0.5), tone(speech_s), silence(1.5)])


@dataclass
class Talk:
    """What one connection did: the core, every action, every message either way."""

    core: LiveConversation
    actions: list[Any] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    closed: tuple[int | None, str | None] | None = None

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]

    def record(self) -> list[tuple[str, str]]:
        return [(m.role, m.text) for m in sorted(self.of(StoreMessage), key=lambda m: m.seq)]


async def converse(url: str, pcm: np.ndarray, config: LiveConfig = CONFIG, *,
                   frame_s: float = 0.002, close: bool = True) -> Talk:
    """Open a Live session, stream ``pcm`` (10x real time), let the last reply come, close
    it with ``session.close`` (if ``close`` and nothing ended it first)."""
    talk = Talk(LiveConversation(config))
    core = talk.core
    async with trio_websocket.open_websocket_url(url) as ws, trio.open_nursery() as nursery:

        async def apply(actions: list[Any]) -> None:
            talk.actions += actions
            for action in actions:
                if isinstance(action, Send):
                    await ws.send_message(core.send(action.event))

        async def read() -> None:
            try:
                while True:
                    message = await ws.get_message()
                    talk.received.append(check_server(json.loads(message)))
                    await apply(core.receive(message, trio.current_time()))
            except trio_websocket.ConnectionClosed as exc:
                talk.closed = (exc.reason.code, exc.reason.reason)
                talk.actions += core.connection_lost(exc.reason.code, exc.reason.reason or "")
            nursery.cancel_scope.cancel()

        async def ticks() -> None:
            while True:
                await trio.sleep(TICK_S)
                await apply(core.tick(trio.current_time()))

        nursery.start_soon(read)
        nursery.start_soon(ticks)
        for wire in core.opening():
            await ws.send_message(wire)
        while not core.configured and core.end is None:
            await trio.sleep(0.01)
        with contextlib.suppress(trio_websocket.ConnectionClosed):  # the service ended it
            for i in range(0, len(pcm), FRAME):
                if not core.configured:
                    break
                await ws.send_message(core.audio(pcm[i : i + FRAME].astype("<i2").tobytes()))
                await trio.sleep(frame_s)
            await trio.sleep(1.5)  # the last reply streams; a pause closes the last utterance
            if close and core.configured:
                await ws.send_message(core.send(SessionClose()))
                await trio.sleep_forever()  # until the service closes the connection
        nursery.cancel_scope.cancel()
    return talk


async def served(**config: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The local backend on loopback and the client events it received (checked)."""
    seen: list[dict[str, Any]] = []
    config.setdefault("realtime_factor", FAST)

    def observe(session_id: str, event: dict[str, Any]) -> None:
        check_client(event)
        seen.append(event)

    config["observer"] = observe
    return local_backend(**config), seen


def live_url(url: str) -> str:
    return url.replace("/v1/realtime", "/v1/live/sessions")


async def test_a_conversation_over_a_websocket() -> None:
    backend, seen = await served(reply_seconds=1.0)
    with trio.fail_after(20):
        async with backend as url:
            talk = await converse(live_url(url), np.concatenate([turn(1.0), turn(1.5)]))
    assert seen[0]["type"] == "session.start"
    assert {e["type"] for e in seen} == {"session.start", "session.input_audio.append",
                                         "session.close"}
    said = [e["delta"] for e in talk.received if e["type"] == "session.output_transcript.delta"]
    robot = "".join(said)
    record = talk.record()
    assert [r for r, _ in record] == ["user", "assistant", "user", "assistant"]
    assert [t for r, t in record if r == "user"] == ["(speech, 1.0 s)", "(speech, 1.5 s)"]
    assert "".join(t for r, t in record if r == "assistant") == robot
    played = b"".join(p.pcm for p in talk.of(Play))
    assert len(played) == 2 * 2 * 24000  # two replies of a second each, every sample
    usages = talk.of(StoreUsage)
    assert usages[-1].final and usages[-1].seconds == max(u.seconds for u in usages)
    assert talk.core.end is not None and talk.core.end.kind is End.DONE
    assert talk.closed is not None and talk.closed[0] == 1000


async def test_an_expired_session_is_followed_by_one_that_remembers() -> None:
    backend, seen = await served(faults=parse_faults(["live_close=expired:1"]))
    with trio.fail_after(20):
        async with backend as url:
            first = await converse(live_url(url), turn(1.0), close=False)
            assert first.core.end is not None and first.core.end.kind is End.EXPIRED
            assert first.closed is not None and first.closed[0] == 1000
            assert first.of(StoreUsage)[-1].final
            seeded = CONFIG.with_history(first.record())  # as the link seeds it (the store)
            second = await converse(live_url(url), silence(0.2), seeded, close=False)
    starts = [e for e in seen if e["type"] == "session.start"]
    assert len(starts) == 2
    history = [(i["role"], i["content"][0]["text"]) for i in starts[1]["session"]["input"]]
    assert history == first.record() and history[0] == ("user", "(speech, 1.0 s)")
    assert second.received[0]["session"]["input"] == starts[1]["session"]["input"]


@pytest.mark.parametrize("how", ["connection_lost", "abort"])
async def test_a_lost_connection_is_lost(how: str) -> None:
    backend, _ = await served(faults=parse_faults([f"live_close={how}:1"]))
    with trio.fail_after(20):
        async with backend as url:
            talk = await converse(live_url(url), turn(1.0), close=False)
    assert talk.core.end is not None and talk.core.end.kind is End.LOST
    closed = [e for e in talk.received if e["type"] == "session.closed"]
    assert [e["reason"] for e in closed] == (["connection_lost"] if how != "abort" else [])
    assert talk.record()[0] == ("user", "(speech, 1.0 s)")  # nothing received is lost


@pytest.mark.parametrize("fault", ["live_error=credit_balance_exhausted",
                                   "live_error=model_not_found",
                                   "live_reject=session.delegation"])
async def test_what_waiting_cannot_fix_is_fatal(fault: str) -> None:
    tools = ({"type": "function", "name": "turn_head", "parameters": {"type": "object"}},)
    backend, _ = await served(faults=parse_faults([fault]))
    with trio.fail_after(20):
        async with backend as url:
            talk = await converse(live_url(url), silence(0.2),
                                  LiveConfig(instructions="x", tools=tools), close=False)
    assert talk.core.end is not None and talk.core.end.kind is End.FATAL
    errors = talk.of(StoreError)
    assert len(errors) == 1 and errors[0].fatal
    assert fault.partition("=")[2] in errors[0].message + (errors[0].code or "")
    assert not talk.of(StoreMessage)
