"""The appliance's side of the store: protocol records mapped to writer calls, and
:class:`AsyncStore`, which keeps SQLite off the event loop.

Every call runs in a worker thread (``trio.to_thread.run_sync``), one at a time through one
``trio.CapacityLimiter(1)``, so the single connection is never used by two threads at once.
A call in progress is not abandoned when its caller is cancelled: a batch either commits or
rolls back as a whole.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import trio

from r2d2voice.realtime.actions import (
    StoreError,
    StoreInterrupted,
    StoreLatency,
    StoreMessage,
    StoreResponse,
    StoreSession,
)
from r2d2voice.storage.database import Store
from r2d2voice.storage.timestamps import WallClock, utc_now
from r2d2voice.storage.writer import Writer

__all__ = ["CLOSE_DEADLINE", "AsyncStore", "WriterCall", "record_calls"]

T = TypeVar("T")
#: One writer call: the (unbound) Writer method and its keyword arguments, session id apart.
WriterCall = tuple[Callable[..., None], dict[str, Any]]
#: Seconds closing the store may take on a shutdown path (shielded from cancellation).
CLOSE_DEADLINE = 2.0


def record_calls(action: Any) -> list[WriterCall]:
    """The writer calls that persist one protocol ``Store*`` record (TypeError otherwise)."""
    if isinstance(action, StoreMessage):
        return [(Writer.upsert_message, {
            "role": action.role, "item_id": action.item_id, "seq": action.seq,
            "text": action.text, "response_id": action.response_id, "raw_event": action.raw})]
    if isinstance(action, StoreInterrupted):
        return [(Writer.mark_interrupted, {"item_id": action.item_id, "seq": action.seq,
                                           "played_ms": action.played_ms})]
    if isinstance(action, StoreResponse):
        return [(Writer.record_response, {
            "response_id": action.response_id, "status": action.status, "usage": action.usage,
            "status_details": action.status_details, "first_audio_ms": action.first_audio_ms})]
    if isinstance(action, StoreLatency):
        return [(Writer.set_response_latency, {"response_id": action.response_id,
                                               "first_played_ms": action.first_played_ms})]
    if isinstance(action, StoreError):
        return [(Writer.record_error, {"source": "service", "type": action.type,
                                       "code": action.code, "message": action.message})]
    if isinstance(action, StoreSession):
        return [(Writer.set_service_session_id,
                 {"service_session_id": action.service_session_id})]
    raise TypeError(f"not a record: {action!r}")


class AsyncStore:
    """A read-write :class:`Store` for trio code: every call in a worker thread, one at a
    time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, now: WallClock = utc_now) -> AsyncStore:
        """Open (create or migrate) the database at ``path`` read-write."""
        return cls(await trio.to_thread.run_sync(functools.partial(Store.open, path, now=now)))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the worker thread, after every earlier call."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                             limiter=self._limiter)

    async def record(self, session_id: str, actions: Iterable[Any]) -> None:
        """Write a batch of protocol records in one transaction (all or nothing)."""
        calls = [call for action in actions for call in record_calls(action)]
        writer = self.store.write

        def write() -> None:
            with writer.batch():
                for method, kwargs in calls:
                    method(writer, session_id, **kwargs)

        await self.call(write)

    async def start_session(self, *, backend: str, model: str, voice: str | None,
                            previous_session_id: str | None = None,
                            metadata: dict[str, Any] | None = None) -> str:
        """A new session row, last in order; returns its id."""
        return await self.call(self.store.write.start_session, backend=backend, model=model,
                               voice=voice, previous_session_id=previous_session_id,
                               metadata=metadata)

    async def end_session(self, session_id: str, stats: dict[str, Any] | None = None) -> None:
        """Stamp the session's end and store its counters, in one transaction."""
        writer = self.store.write

        def write() -> None:
            with writer.batch():
                writer.end_session(session_id)
                if stats is not None:
                    writer.set_session_stats(session_id, stats)

        await self.call(write)

    async def recent_turns(self, session_ids: Sequence[str] | None,
                           limit: int) -> list[tuple[str, str]]:
        """The last ``limit`` turns of ``session_ids`` in conversation order (context)."""
        return await self.call(self.store.read.recent_turns, session_ids, limit)

    async def record_error(self, session_id: str | None, *, source: str, type: str | None,
                           code: str | None, message: str) -> None:
        """Record an error (``source`` 'service' | 'local')."""
        await self.call(self.store.write.record_error, session_id, source=source, type=type,
                        code=code, message=message)

    async def aclose(self) -> None:
        """Close the connection after the calls before it; shielded, at most
        :data:`CLOSE_DEADLINE` seconds of waiting for them."""
        with trio.move_on_after(CLOSE_DEADLINE) as scope:
            scope.shield = True
            await self.call(self.store.close)
