"""The appliance's side of the store: protocol records mapped to writer calls, and
:class:`AsyncStore`, which keeps SQLite off the event loop and keeps recording through a full
disk.

Every call runs in a worker thread (``trio.to_thread.run_sync``), one at a time through one
``trio.CapacityLimiter(1)``, so the single connection is never used by two threads at once.
A call in progress is not abandoned when its caller is cancelled: a batch either commits or
rolls back as a whole.

Writes go through one ordered queue. While the database can be written, a write returns once
committed (the caller is paced by the disk). When it cannot (disk full, I/O error, locked, or
not even openable at start), writes wait in memory and the caller goes on at once; they are
retried with backoff (on the next write that comes when a retry is due, or by :meth:`run`'s
timer) and committed in order when space returns. See :mod:`r2d2voice.storage.pending` for the
bound and what happens beyond it. Wall-clock labels are stamped when a write is queued.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

import trio

from r2d2voice.protocol.actions import (
    StoreError,
    StoreInterrupted,
    StoreLatency,
    StoreMessage,
    StoreResponse,
    StoreSession,
    StoreUsage,
)
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.database import Store
from r2d2voice.storage.health import describe, is_transient
from r2d2voice.storage.pending import (
    DROP_LOG_EVERY,
    PENDING_BOUND,
    Backoff,
    PendingWrite,
    StoreStatus,
)
from r2d2voice.storage.retention import (
    PRUNE_EVERY,
    PruneResult,
    ShippedFilter,
    prune_and_shrink,
)
from r2d2voice.storage.timestamps import WallClock, utc_now
from r2d2voice.storage.writer import Writer, new_session_id

__all__ = ["CLOSE_DEADLINE", "AsyncStore", "StoreStatus", "WriterCall", "open_store",
           "record_calls", "store_options"]

log = logging.getLogger("r2d2voice.storage.recorder")

T = TypeVar("T")
#: One writer call: the (unbound) Writer method and its keyword arguments, session id apart.
WriterCall = tuple[Callable[..., None], dict[str, Any]]
#: Seconds closing the store may take on a shutdown path (shielded from cancellation).
CLOSE_DEADLINE = 2.0


def billed_row(usage: StoreUsage) -> dict[str, Any]:
    """A service session's billed time as a ``responses`` row of its own: response id
    ``billed:<service session>``, ``status_details`` ``{"billed_seconds": S}`` (each update
    replaces the total), ``in_progress`` until the final one. Usage reports price it per
    minute and leave it out of the response counts (:data:`~.queries.BILLED_SECONDS`)."""
    return {"response_id": f"billed:{usage.service_session_id}",
            "status": "completed" if usage.final else "in_progress",
            "status_details": {"billed_seconds": usage.seconds}}


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
    if isinstance(action, StoreUsage):
        return [(Writer.record_response, billed_row(action))]
    if isinstance(action, StoreLatency):
        return [(Writer.set_response_latency, {"response_id": action.response_id,
                                               "first_played_ms": action.first_played_ms})]
    if isinstance(action, StoreError):
        return [(Writer.record_error, {"source": "service", "type": action.type,
                                       "code": action.code, "message": action.message})]
    if isinstance(action, StoreSession):
        return [(Writer.set_service_session_id,
                 {"service_session_id": action.service_session_id, "model": action.model})]
    if isinstance(action, StoreToolCall):
        return [(Writer.record_tool_call, {
            "call_id": action.call_id, "item_id": action.item_id,
            "response_id": action.response_id, "seq": action.seq, "name": action.name,
            "arguments": action.arguments})]
    if isinstance(action, StoreToolResult):
        return [(Writer.record_tool_result, {
            "call_id": action.call_id, "status": action.status, "output": action.output,
            "exit_code": action.exit_code, "duration_ms": action.duration_ms})]
    raise TypeError(f"not a record: {action!r}")


class AsyncStore:
    """A read-write store for trio code: every call in a worker thread, one at a time; writes
    queued in order and retried while the database cannot be written. Use :meth:`open` (and
    start :meth:`run`), or :func:`open_store`."""

    def __init__(self, path: str | os.PathLike[str], *, now: WallClock = utc_now,
                 store_text: bool = True, bound: int = PENDING_BOUND,
                 on_status: Callable[[StoreStatus], None] | None = None,
                 backoff: Backoff | None = None) -> None:
        self.path = os.fspath(path)
        self.now = now
        self.store_text = store_text
        self.bound = bound
        self.on_status = on_status
        self.store: Store | None = None
        self._backoff = backoff or Backoff()
        self._limiter = trio.CapacityLimiter(1)
        self._lock = trio.Lock()  # one drain at a time: the queue's order is the write order
        self._queue: deque[PendingWrite] = deque()
        self._waiting = 0  # records in the queue
        self._dropped = 0
        self._transcripts = [0, 0]  # transcript messages: waiting, dropped
        self._retries = 0
        self._reason: str | None = None  # None: the database can be written
        self._retry_at = float("-inf")
        self._attempt = 0.0  # trio time the current write attempt started
        self._failing = trio.Event()
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> AsyncStore:
        """Open (create or migrate) the database at ``path`` read-write. A database that is
        not ours raises :class:`~r2d2voice.errors.UsageError`; one that cannot be opened now
        (disk full, I/O error) does not: writes wait for it. Keywords: see the class."""
        self = cls(path, **kwargs)
        self._attempt = trio.current_time()
        await self._open_store()
        return self

    # -- status -----------------------------------------------------------------------

    @property
    def status(self) -> StoreStatus:
        """The state for ``STATUS=`` and the log (``str()`` is the line to show)."""
        state = "closed" if self._closed else "waiting" if self._reason else "ok"
        return StoreStatus(state, self._waiting, self._dropped, self._reason, self._retries,
                           self._retry_at if state == "waiting" else None,
                           *self._transcripts)

    def _changed(self) -> None:
        if self.on_status is not None:
            self.on_status(self.status)

    # -- calls ------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the worker thread, after every earlier call."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                             limiter=self._limiter)

    async def record(self, session_id: str, actions: Iterable[Any]) -> None:
        """Write a batch of protocol records in one transaction (all or nothing)."""
        actions = list(actions)
        calls = [call for action in actions for call in record_calls(action)]
        transcripts = sum(isinstance(action, StoreMessage) for action in actions)

        def write(writer: Writer) -> None:
            for method, kwargs in calls:
                method(writer, session_id, **kwargs)

        await self._submit(PendingWrite(write, len(calls), self.now(), "records",
                                        transcripts=transcripts))

    async def start_session(self, *, backend: str, model: str, voice: str | None,
                            previous_session_id: str | None = None,
                            metadata: dict[str, Any] | None = None) -> str:
        """A new session row, last in order; returns its id (made here, so a session can
        start while the database waits)."""
        at = self.now()
        sid = new_session_id(at)
        write = functools.partial(Writer.start_session, backend=backend, model=model,
                                  voice=voice, previous_session_id=previous_session_id,
                                  metadata=metadata, session_id=sid)
        await self._submit(PendingWrite(write, 1, at, "session start", essential=True))
        return sid

    async def end_session(self, session_id: str, stats: dict[str, Any] | None = None) -> None:
        """Stamp the session's end and store its counters, in one transaction."""

        def write(writer: Writer) -> None:
            writer.end_session(session_id)
            if stats is not None:
                writer.set_session_stats(session_id, stats)

        await self._submit(PendingWrite(write, 1, self.now(), "session end", essential=True))

    async def update_session_metadata(self, session_id: str, values: dict[str, Any]) -> None:
        """Set top-level keys of a session's metadata, keeping the others."""
        write = functools.partial(Writer.update_session_metadata, session_id=session_id,
                                  values=values)
        await self._submit(PendingWrite(write, 1, self.now(), "session metadata"))

    async def record_error(self, session_id: str | None, *, source: str, type: str | None,
                           code: str | None, message: str) -> None:
        """Record an error (``source`` 'service' | 'local')."""
        write = functools.partial(Writer.record_error, session_id=session_id, source=source,
                                  type=type, code=code, message=message)
        await self._submit(PendingWrite(write, 1, self.now(), "error"))

    async def recent_turns(self, session_ids: Sequence[str] | None,
                           limit: int) -> list[tuple[str, str]]:
        """The last ``limit`` stored turns of ``session_ids`` in conversation order (context);
        none while the database cannot be read."""
        if self.store is None:
            return []
        try:
            return await self.call(self.store.read.recent_turns, session_ids, limit)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("context not read: %s", describe(exc))
            return []

    # -- the queue --------------------------------------------------------------------

    async def _submit(self, item: PendingWrite) -> None:
        if self._closed:
            raise RuntimeError(f"{self.path}: the store is closed")
        if self._reason is not None and trio.current_time() >= self._retry_at:
            await self._drain()  # a retry is due: make room before counting against the bound
        if not self._admit(item):
            return
        try:
            await self._drain()
            if item.error is not None:
                raise item.error
        finally:
            item.awaited = False  # from here on, a failure is logged and counted, not raised

    def _admit(self, item: PendingWrite) -> bool:
        if self._reason is not None and not item.essential \
                and self._waiting + item.records > self.bound:
            self._dropped += item.records
            self._transcripts[1] += item.transcripts
            if self._dropped == item.records or self._dropped % DROP_LOG_EVERY < item.records:
                log.error("%s: %d records already waiting (the bound); dropping new records:"
                          " %d dropped so far", self._reason, self._waiting, self._dropped)
            self._changed()
            return False
        self._queue.append(item)
        self._waiting += item.records
        self._transcripts[0] += item.transcripts
        if self._reason is not None:
            self._changed()
        return True

    async def _drain(self, *, force: bool = False) -> None:
        """Write the queue in order; stop at a transient failure (retry later). Outside a
        retry's due time, a waiting store only queues (``force``: try anyway)."""
        async with self._lock:
            self._attempt = trio.current_time()  # backoff counts from here
            if self._reason is not None:
                if not force and self._attempt < self._retry_at:
                    return
                self._retries += 1
            if self.store is None and not await self._open_store():
                return
            while self._queue:
                item = self._queue[0]
                try:
                    await self.call(self._apply, item)
                except Exception as exc:
                    if is_transient(exc):
                        self._fail(exc)
                        return
                    item.error = exc
                    if not item.awaited:
                        self._dropped += item.records
                        self._transcripts[1] += item.transcripts
                        log.error("a queued write (%s) was refused and is dropped: %s",
                                  item.what, exc)
                self._queue.popleft()
                self._waiting -= item.records
                self._transcripts[0] -= item.transcripts
            if self._reason is not None:
                self._recovered()

    def _apply(self, item: PendingWrite) -> None:  # in the worker thread
        assert self.store is not None
        writer = self.store.write
        with writer.labels_at(item.at), writer.batch():
            item.write(writer)

    async def _open_store(self) -> bool:
        try:
            self.store = await trio.to_thread.run_sync(functools.partial(
                Store.open, self.path, now=self.now, store_text=self.store_text),
                limiter=self._limiter)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._fail(exc)
            return False
        return True

    def _fail(self, exc: Exception) -> None:
        reason = describe(exc)
        if self._reason is None:
            log.error("%s: keeping records in memory (at most %d) and retrying: %s",
                      reason, self.bound, exc)
        self._reason = reason
        self._retry_at = self._attempt + self._backoff.next_delay()
        self._failing.set()
        self._changed()

    def _recovered(self) -> None:
        log.warning("database writable again after %s; everything waiting is written"
                    " (%d records dropped in all)", self._reason, self._dropped)
        self._reason = None
        self._backoff.reset()
        self._changed()

    # -- background -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Retry on a timer while the database cannot be written (runs until cancelled)."""
        task_status.started()
        while True:
            if self._reason is None:
                self._failing = trio.Event()
                await self._failing.wait()
                continue
            await trio.sleep_until(self._retry_at)
            await self._drain()

    async def prune_every(self, older_than: timedelta, only_shipped: ShippedFilter | None = None,
                          *, every: float = PRUNE_EVERY,
                          on_prune: Callable[[PruneResult], None] | None = None) -> None:
        """Delete conversations older than ``older_than`` now and every ``every`` seconds
        (``R2D2_RETENTION_DAYS``); skipped while the database waits. Runs until cancelled."""
        while True:
            if self.store is not None and self._reason is None:
                try:
                    result = await self.call(prune_and_shrink, self.store.conn,
                                             self.now() - older_than, only_shipped)
                    if result.sessions:
                        log.info("retention: %s", result)
                    if on_prune is not None:
                        on_prune(result)
                except Exception as exc:  # never let housekeeping end the conversation
                    if is_transient(exc):
                        log.warning("retention: prune skipped: %s", describe(exc))
                    else:
                        log.error("retention: prune failed: %s", exc, exc_info=True)
            await trio.sleep(every)

    async def aclose(self) -> None:
        """A last try at what is waiting, then close; shielded, at most
        :data:`CLOSE_DEADLINE` seconds. Records still waiting are lost, loudly."""
        if self._closed:
            return
        with trio.move_on_after(CLOSE_DEADLINE) as scope:
            scope.shield = True
            if self._queue:
                await self._drain(force=True)
            self._closed = True
            if self._waiting:
                log.error("%s: %d records (%d transcripts) could not be written and are lost",
                          self._reason or "closing", self._waiting, self._transcripts[0])
            if self.store is not None:
                await self.call(self.store.close)
        self._closed = True
        self._changed()


@asynccontextmanager
async def open_store(path: str | os.PathLike[str], *, retention: timedelta | None = None,
                     only_shipped: ShippedFilter | None = None,
                     on_prune: Callable[[PruneResult], None] | None = None,
                     **kwargs: Any) -> AsyncIterator[AsyncStore]:
    """An open :class:`AsyncStore` with its retry timer (and, with ``retention``, the
    periodic prune) running; closed on exit. Other keywords: see :class:`AsyncStore`."""
    store = await AsyncStore.open(path, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            if retention is not None:
                nursery.start_soon(functools.partial(store.prune_every, retention,
                                                     only_shipped, on_prune=on_prune))
            yield store
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def store_options(settings: Any) -> dict[str, Any]:
    """:func:`open_store` keywords from the settings: privacy mode (``R2D2_STORE_TEXT``),
    retention (``R2D2_RETENTION_DAYS``) and, with shipping configured (``R2D2_SHIP_URL``),
    pruning only what the fleet server has."""
    options: dict[str, Any] = {"store_text": settings.store_text}
    if settings.retention_days:
        options["retention"] = timedelta(days=settings.retention_days)
        if settings.ship_url:
            from r2d2voice.storage.shipping.local import shipped_sessions

            options["only_shipped"] = shipped_sessions
    return options
