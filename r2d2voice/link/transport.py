"""The websocket to the Realtime service: connect with auth, send and receive JSON events."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
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

__all__ = ["ConnectionClosed", "Endpoint", "open_realtime", "send_event"]


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


@asynccontextmanager
async def open_realtime(
    endpoint: Endpoint, *, connect_timeout: float = 15.0
) -> AsyncIterator[WebSocketConnection]:
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
        yield ws


async def send_event(ws: WebSocketConnection, event: dict[str, Any]) -> None:
    """Send one client event as a JSON text frame."""
    await ws.send_message(json.dumps(event, separators=(",", ":")))
