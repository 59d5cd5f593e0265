"""The link's byte pipe to the Realtime service: the :class:`Transport` protocol the link uses,
and its websocket implementation (connect with auth, send and receive text frames, ping).

A transport that goes away raises :class:`LinkClosed` from every call; the link turns that into
an input of the protocol core (``Conversation.connection_lost``), never a crash.
"""

from __future__ import annotations

import socket
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
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from r2d2voice.errors import ConfigError, RuntimeFailure

#: Audio deltas are base64 PCM; a long reply chunk can be several hundred KiB.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

__all__ = ["Connector", "Endpoint", "LinkClosed", "Transport", "WebSocketTransport",
           "open_realtime"]


class LinkClosed(Exception):
    """The connection is gone; ``reason`` says how (``close code 1011``, ``closed``, …) and
    ``code`` is the close frame's code, if there was one."""

    def __init__(self, reason: str = "closed", code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


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
    #: the handshake header that carries the key: ``Authorization`` (as ``Bearer KEY``, OpenAI)
    #: or the key itself under another name (``api-key``, Azure OpenAI)
    auth_header: str = "Authorization"
    #: the setting that holds the key, named when the service rejects it
    key_setting: str = "OPENAI_API_KEY"

    def headers(self) -> list[tuple[str, str]]:
        """The handshake's auth header (none without a key)."""
        if not self.api_key:
            return []
        if self.auth_header.lower() == "authorization":
            return [("Authorization", f"Bearer {self.api_key}")]
        return [(self.auth_header, self.api_key)]

    @property
    def full_url(self) -> str:
        """``url`` with ``?model=`` added (kept if the URL already names one; none without a
        model: GPT-Live names it in ``session.start``)."""
        parts = urlsplit(self.url)
        if "model=" in parts.query or not self.model:
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


class WebSocketTransport:
    """:class:`Transport` over a trio-websocket connection (on any stream: tests run it over
    an in-memory one)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: str) -> None:
        try:
            await self.ws.send_message(message)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def ping(self) -> None:
        try:
            await self.ws.ping()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def aclose(self) -> None:
        await self.ws.aclose()


def _closed(exc: ConnectionClosed) -> LinkClosed:
    if exc.reason is None:
        return LinkClosed("closed")
    return LinkClosed(f"close code {exc.reason.code}", exc.reason.code)


@asynccontextmanager
async def open_realtime(
    endpoint: Endpoint, *, connect_timeout: float = 15.0
) -> AsyncIterator[Transport]:
    """Open the websocket: Bearer auth, verified TLS for wss, no ``OpenAI-Beta`` header (GA).

    A rejected key (HTTP 401/403) is a ConfigError (exit 3); other failures a RuntimeFailure.
    """
    headers = endpoint.headers()
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
                    f"(HTTP {exc.status_code}): check {endpoint.key_setting}"
                ) from None
            raise RuntimeFailure(
                f"the Realtime service at {endpoint.display} refused the connection "
                f"(HTTP {exc.status_code})"
            ) from None
        except (HandshakeError, OSError, trio.TooSlowError) as exc:
            reason = connect_failure(exc, connect_timeout)
            if ssl_context is not None and reason.startswith("no answer"):
                # trio-websocket loses a TLS failure and waits for its timeout: ask TLS alone
                reason = await _tls_failure(endpoint.url, ssl_context) or reason
            raise RuntimeFailure(f"cannot connect to {endpoint.display}: {reason}") from None
        yield WebSocketTransport(ws)


def connect_failure(exc: BaseException, timeout: float) -> str:
    """What failed, for a person: DNS, a refused or unreachable port, TLS, a timeout.

    trio-websocket wraps the cause in a bare HandshakeError, and trio's "all attempts to
    connect failed" wraps the per-address errors: look through both.
    """
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if e in seen:
            continue
        seen.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += list(getattr(e, "exceptions", ()))
    for e in seen:
        if isinstance(e, socket.gaierror):
            return f"DNS lookup failed ({e.strerror or e})"
    for e in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted ({e.verify_message or e.reason})"
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed ({e.reason or e})"
    for e in seen:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (nothing listens on that port)"
        if isinstance(e, (trio.TooSlowError, ConnectionTimeout)):
            return f"no answer within {timeout:g} s"
    for e in seen:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return str(exc) or type(exc).__name__


async def _tls_failure(url: str, context: ssl.SSLContext, timeout: float = 5.0) -> str | None:
    """Why a TLS handshake with ``url``'s host fails, or None if it does not (or hangs)."""
    parts = urlsplit(url)
    try:
        with trio.move_on_after(timeout):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname or "", parts.port or 443, ssl_context=context)
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)
    except (OSError, trio.BrokenResourceError) as exc:
        reason = connect_failure(exc, timeout)
        return reason if reason.startswith("TLS") else None
    return None
