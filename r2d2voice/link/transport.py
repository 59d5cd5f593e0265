"""The link's byte pipe to the Realtime service: the :class:`Transport` protocol the link uses,
and its websocket implementation (connect with auth, send and receive text frames, ping).

A transport that goes away raises :class:`LinkClosed` from every call; the link turns that into
an input of the protocol core (``Conversation.connection_lost``), never a crash.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from r2d2voice.errors import ConfigError, RuntimeFailure

#: Audio deltas are base64 PCM; a long reply chunk can be several hundred KiB.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

__all__ = ["Connector", "Endpoint", "LinkClosed", "Transport", "open_realtime"]


class LinkClosed(Exception):
    """The connection is gone; ``reason`` says how (``close code 1011``, ``closed``, …)."""

    def __init__(self, reason: str = "closed") -> None:
        super().__init__(reason)
        self.reason = reason


class Transport(Protocol):
    """One connection to the service: text frames both ways, pings, close."""

    async def send(self, message: str) -> None:
        """Send one text frame; LinkClosed once the connection is gone."""

    async def receive(self) -> str | bytes:
        """The next frame; LinkClosed once the connection is gone."""

    async def ping(self) -> None:
        """Return when the service answered a ping (the caller bounds the wait)."""

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""


@dataclass(frozen=True)
class Endpoint:
    """Where to connect. ``repr`` never shows the key."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    @property
    def full_url(self) -> str:
        """``url`` with ``?model=`` added (kept if the URL already names one)."""
        parts = urlsplit(self.url)
        if "model=" in parts.query:
            return self.url
        query = "&".join(q for q in (parts.query, urlencode({"model": self.model})) if q)
        return urlunsplit(parts._replace(query=query))

    @property
    def display(self) -> str:
        """The URL without its query, for messages."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(query=""))


#: Opens one connection: ConfigError for a rejected key, RuntimeFailure for anything else.
Connector = Callable[[Endpoint], AbstractAsyncContextManager[Transport]]


class _WebSocket:
    """:class:`Transport` over a trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: str) -> None:
        try:
            await self.ws.send_message(message)
        except ConnectionClosed as exc:
            raise LinkClosed(_reason(exc)) from None

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except ConnectionClosed as exc:
            raise LinkClosed(_reason(exc)) from None

    async def ping(self) -> None:
        try:
            await self.ws.ping()
        except ConnectionClosed as exc:
            raise LinkClosed(_reason(exc)) from None

    async def aclose(self) -> None:
        await self.ws.aclose()


def _reason(exc: ConnectionClosed) -> str:
    return f"close code {exc.reason.code}" if exc.reason else "closed"


@asynccontextmanager
async def open_realtime(
    endpoint: Endpoint, *, connect_timeout: float = 15.0
) -> AsyncIterator[Transport]:
    """Open the websocket: Bearer auth, verified TLS for wss, no ``OpenAI-Beta`` header (GA).

    A rejected key (HTTP 401/403) is a ConfigError (exit 3); other failures a RuntimeFailure.
    """
    headers = [("Authorization", f"Bearer {endpoint.api_key}")] if endpoint.api_key else []
    ssl_context = ssl.create_default_context() if endpoint.url.startswith("wss://") else None
    async with AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(
                open_websocket_url(
                    endpoint.full_url,
                    ssl_context,
                    extra_headers=headers,
                    max_message_size=MAX_MESSAGE_SIZE,
                    connect_timeout=connect_timeout,
                    disconnect_timeout=2.0,
                )
            )
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                raise ConfigError(
                    f"the Realtime service at {endpoint.display} rejected the API key "
                    f"(HTTP {exc.status_code}): check OPENAI_API_KEY"
                ) from None
            raise RuntimeFailure(
                f"the Realtime service at {endpoint.display} refused the connection "
                f"(HTTP {exc.status_code})"
            ) from None
        except (HandshakeError, OSError, trio.TooSlowError) as exc:
            reason = type(exc).__name__
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            raise RuntimeFailure(f"cannot connect to {endpoint.display}: {reason}") from None
        yield _WebSocket(ws)
