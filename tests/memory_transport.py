"""An in-memory :class:`~r2d2voice.link.transport.Transport` pair: the link against a scripted
service in the same trio run, with no sockets (tests run it on a MockClock)."""

from __future__ import annotations

import trio

from r2d2voice.link.transport import LinkClosed

#: Frames in flight each way; a full pipe makes the sender wait, as a TCP window would.
PIPE_BOUND = 64


class _Wire:
    """State both ends share: how it was closed, and whether it went silent (half-open)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.code: int | None = None
        self.silent = False

    def closed(self) -> LinkClosed:
        return LinkClosed(self.reason or "closed", self.code)


class MemoryTransport:
    """One end of an in-memory connection."""

    def __init__(self, outbox: trio.MemorySendChannel[str | bytes],
                 inbox: trio.MemoryReceiveChannel[str | bytes], wire: _Wire) -> None:
        self._outbox = outbox
        self._inbox = inbox
        self._wire = wire
        self.sent = 0

    @property
    def closed(self) -> bool:
        return self._wire.reason is not None

    def go_silent(self) -> None:
        """From now on nothing arrives either way and pings go unanswered (no FIN, no RST)."""
        self._wire.silent = True

    async def send(self, message: str | bytes) -> None:
        if self._wire.reason is not None:
            raise self._wire.closed()
        if self._wire.silent:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._outbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._wire.closed() from None
        self.sent += 1

    async def receive(self) -> str | bytes:
        try:
            return await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._wire.closed() from None

    async def ping(self) -> None:
        if self._wire.reason is not None:
            raise self._wire.closed()
        if self._wire.silent:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def aclose(self, code: int = 1000) -> None:
        """Close both directions; the peer sees ``close code {code}`` (idempotent)."""
        if self._wire.reason is None:
            self._wire.reason, self._wire.code = f"close code {code}", code
        self._outbox.close()
        self._inbox.close()
        await trio.lowlevel.checkpoint()


def memory_pair() -> tuple[MemoryTransport, MemoryTransport]:
    """A connected (client, service) pair."""
    wire = _Wire()
    up_send, up_recv = trio.open_memory_channel[str | bytes](PIPE_BOUND)
    down_send, down_recv = trio.open_memory_channel[str | bytes](PIPE_BOUND)
    return MemoryTransport(up_send, down_recv, wire), MemoryTransport(down_send, up_recv, wire)
