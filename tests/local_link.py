"""The real local backend as the link's peer, over an in-memory stream: real trio-websocket
framing (close codes, pings) and the backend's own session logic, no kernel sockets, so a whole
conversation runs on trio's MockClock. ``LocalLink.connect`` is a link ``Connector``.

On a MockClock that jumps as soon as every task waits, a worker thread (the backend synthesizes
its beeps in one) would let time leap while it runs: :func:`inline_threads` runs the backend's
synthesis inline instead (it is pure numpy; nothing else changes)."""

from __future__ import annotations

import random
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import trio
import trio.testing
import trio_websocket
from fake_service import MemorySessions, NullSink

from r2d2voice.appliance.gate import AlwaysGate
from r2d2voice.appliance.pipeline import Run, RunResult, run_pipeline
from r2d2voice.link.parts import LinkParts
from r2d2voice.link.state import Quiet
from r2d2voice.link.transport import MAX_MESSAGE_SIZE, Endpoint, Transport, WebSocketTransport
from r2d2voice.localbackend import live_server, streaming
from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.server import serve_connection
from r2d2voice.realtime.client_events import SessionConfig

ENDPOINT = Endpoint("mem://local", "gpt-realtime-2.1")
CFG = SessionConfig(instructions="x")


def inline_threads(monkeypatch: Any) -> None:
    """Make the local backend's ``trio.to_thread.run_sync`` run the function inline (both of
    its protocols)."""

    async def run_sync(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    shim = types.SimpleNamespace(**{k: getattr(trio, k) for k in dir(trio)
                                    if not k.startswith("__")})
    shim.to_thread = types.SimpleNamespace(run_sync=run_sync)
    for module in (streaming, live_server):  # Realtime replies, GPT-Live replies
        monkeypatch.setattr(module, "trio", shim)


class LocalLink:
    """Connections to the local backend; every client event each session received is kept in
    ``events`` as (connection index, event), and when each connection opened in ``opened``."""

    def __init__(self, config: BackendConfig | None = None, *, path: str = "/v1/realtime",
                 **settings: Any) -> None:
        config = config or BackendConfig(**settings)
        #: the request path (``/v1/live/sessions``: the backend speaks GPT-Live)
        self.path = path
        self.sessions: dict[str, int] = {}
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.opened: list[float] = []
        self.config = replace(config, observer=self._observe)

    def _observe(self, session_id: str, event: dict[str, Any]) -> None:
        index = self.sessions.setdefault(session_id, len(self.sessions))
        self.events.append((index, event))

    @property
    def connections(self) -> int:
        return len(self.opened)

    def of_type(self, type_: str, conn: int | None = None) -> list[dict[str, Any]]:
        return [e for n, e in self.events
                if e.get("type") == type_ and (conn is None or n == conn)]

    def outputs(self) -> list[dict[str, Any]]:
        """The ``function_call_output`` items the client sent."""
        return [e["item"] for e in self.of_type("conversation.item.create")
                if e["item"].get("type") == "function_call_output"]

    @asynccontextmanager
    async def connect(self, endpoint: Endpoint) -> AsyncIterator[Transport]:
        self.opened.append(trio.current_time())
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server, self.config)
            ws = await trio_websocket.wrap_client_stream(
                nursery, client, "localhost",
                f"{self.path}?model={endpoint.model}" if endpoint.model else self.path,
                max_message_size=MAX_MESSAGE_SIZE)
            try:
                yield WebSocketTransport(ws)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()
                nursery.cancel_scope.cancel()


async def run_conversation(endpoint: Endpoint, config: SessionConfig, source: Any, sink: Any,
                           sessions: Any, record: Any, *, stopper: Any = None,
                           buffer: Any = None, toolbox: Any = None, gate: Any = None,
                           **link: Any) -> RunResult:
    """One always-listening run through the real pipeline (what ``compose.hold`` builds from
    settings, here from parts); ``link`` are :class:`LinkParts` fields."""
    from r2d2voice.appliance.context import Stopper
    from r2d2voice.audio.playout import PlayoutBuffer

    gate = gate or AlwaysGate(live=source.live, vad=(0.5, 300, 500), console=Quiet())
    parts = LinkParts(endpoint, config, source, sessions, gate, **link)
    return await run_pipeline(Run(parts, source, sink, record, stopper=stopper or Stopper(),
                                  buffer=buffer or PlayoutBuffer(), toolbox=toolbox))


async def talk(link: LocalLink, source: Any, *, config: SessionConfig = CFG, sink: Any = None,
               sessions: MemorySessions | None = None, **kw: Any) -> tuple[Any, MemorySessions]:
    """A whole conversation with the local backend (run_conversation, in memory)."""
    sessions = sessions or MemorySessions()
    kw.setdefault("rng", random.Random(0))
    ctx = await run_conversation(ENDPOINT, config, source, sink or NullSink(), sessions,
                                 sessions.record, connect=link.connect, **kw)
    return ctx, sessions
