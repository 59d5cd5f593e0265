"""Websocket clients of the local backend for tests: over loopback TCP, or in memory (no kernel
sockets, so the whole connection runs on trio's MockClock). Every JSON event received is
validated against the openai SDK's schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio
import trio.testing
import trio_websocket
from localpeer import FRAME, SERVER_EVENT, b64
from support import local_backend

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.server import serve_connection

FAST = 50.0  # realtime_factor for wall-clock tests: a 1 s reply streams in 20 ms


class Client:
    """A raw websocket client; every JSON event received is validated against the SDK schema
    and stamped with trio's clock (``times``)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self._n = 0

    async def send(self, type_: str, **body: Any) -> str:
        self._n += 1
        event_id = f"evt_test_{self._n}"
        await self.ws.send_message(json.dumps({"type": type_, "event_id": event_id, **body}))
        return event_id

    async def recv(self) -> dict[str, Any]:
        event = json.loads(await self.ws.get_message())
        SERVER_EVENT.validate_python(event)
        self.events.append(event)
        self.times.append(trio.current_time())
        return event

    async def until(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        """Events up to and including the first ``type_`` whose fields equal ``match``."""
        got = []
        while True:
            event = await self.recv()
            got.append(event)
            if event["type"] == type_ and all(event.get(k) == v for k, v in match.items()):
                return got

    def time_of(self, event: dict[str, Any]) -> float:
        return self.times[next(i for i, e in enumerate(self.events) if e is event)]

    async def stream(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), FRAME):
            await self.send("input_audio_buffer.append", audio=b64(pcm[i : i + FRAME]))

    async def update(self, **session: Any) -> dict[str, Any]:
        await self.send("session.update", session={"type": "realtime", **session})
        return (await self.until("session.updated"))[-1]["session"]


@asynccontextmanager
async def backend(**config: Any) -> AsyncIterator[str]:
    """The local backend on a loopback port (replies at :data:`FAST` unless told)."""
    config.setdefault("realtime_factor", FAST)
    async with local_backend(**config) as url:
        yield url


@asynccontextmanager
async def connect(url: str, headers: list[tuple[str, str]] | None = None
                  ) -> AsyncIterator[Client]:
    """A client over TCP, past ``session.created``."""
    async with trio_websocket.open_websocket_url(f"{url}?model=gpt-realtime-2.1",
                                                 extra_headers=headers) as ws:
        client = Client(ws)
        created = await client.recv()
        assert created["type"] == "session.created"
        yield client


class Sniffer(trio.abc.Stream):
    """A stream that keeps a copy of every byte it receives (to see control frames)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def in_memory(config: BackendConfig, headers: list[tuple[bytes, bytes]] | None = None,
                    model: str = "gpt-realtime-2.1") -> AsyncIterator[tuple[Client, Sniffer]]:
    """One connection to the backend over an in-memory stream (MockClock-friendly); the client
    has not read ``session.created`` yet."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    sniffer = Sniffer(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, config)
        ws = await trio_websocket.wrap_client_stream(
            nursery, sniffer, "localhost", f"/v1/realtime?model={model}",  # type: ignore[arg-type]
            extra_headers=headers, max_message_size=16 * 2**20)
        yield Client(ws), sniffer
        with trio.move_on_after(1):
            await ws.aclose()
        nursery.cancel_scope.cancel()
