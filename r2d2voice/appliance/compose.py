"""Composes a run: service endpoint (OpenAI or the embedded local backend), store, pipeline."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from r2d2voice.appliance.pipeline import (
    Console,
    Context,
    LinkPolicy,
    Sink,
    Source,
    Stopper,
    record_calls,
    run_conversation,
)
from r2d2voice.link.transport import Endpoint
from r2d2voice.realtime import protocol as p
from r2d2voice.storage.store import Store
from r2d2voice.system.config import Settings

log = logging.getLogger("r2d2voice.appliance.compose")
T = TypeVar("T")


class AsyncStore:
    """Runs every Store call in a worker thread, one at a time (one shared CapacityLimiter(1)):
    nothing touches SQLite on the event loop thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.limiter = trio.CapacityLimiter(1)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                             limiter=self.limiter)

    async def record(self, session_id: str, actions: list[Any]) -> None:
        """Write a batch of protocol Store* actions in one transaction."""

        def write() -> None:
            with self.store.batch():
                for action in actions:
                    for name, kwargs in record_calls(action):
                        getattr(self.store, name)(session_id, **kwargs)

        await self.call(write)


@asynccontextmanager
async def open_endpoint(settings: Settings, url: str | None = None) -> AsyncIterator[Endpoint]:
    """The service to talk to: the embedded local backend on an ephemeral loopback port, or
    the configured Realtime URL (``url`` overrides it) with the API key."""
    if settings.backend == "local" and url is None:
        from r2d2voice.localbackend.server import BackendConfig, serve_local

        # embedded, the backend's own chatter is noise next to the transcripts
        if logging.getLogger().level > logging.DEBUG:
            logging.getLogger("r2d2voice.localbackend.server").setLevel(logging.WARNING)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_local, "127.0.0.1", 0,
                                      BackendConfig(realtime_factor=10.0))
            yield Endpoint(f"ws://127.0.0.1:{port}/v1/realtime", settings.model, None)
            nursery.cancel_scope.cancel()
        return
    key = settings.require_api_key() if settings.backend == "openai" else settings.api_key
    yield Endpoint(url or settings.realtime_url, settings.model, key)


def session_config(settings: Settings) -> p.SessionConfig:
    return p.SessionConfig(
        instructions=settings.instructions,
        voice=settings.voice,
        transcribe_model=settings.transcribe_model,
        vad_threshold=settings.vad_threshold,
        vad_prefix_ms=settings.vad_prefix_ms,
        vad_silence_ms=settings.vad_silence_ms,
        retention_ratio=settings.truncation_ratio,
        token_limit=settings.context_token_limit or None,
    )


@dataclass
class Outcome:
    session_id: str
    ctx: Context | None
    wall_seconds: float


class StoreSessions:
    """Service sessions as rows in the store: one per connection, chained after reconnects."""

    def __init__(self, store: AsyncStore, *, backend: str, model: str, voice: str,
                 metadata: dict[str, Any]) -> None:
        self.store = store
        self.backend, self.model, self.voice = backend, model, voice
        self.metadata = metadata

    async def begin(self, previous: str | None) -> str:
        return await self.store.call(
            self.store.store.start_session, backend=self.backend, model=self.model,
            voice=self.voice, previous_session_id=previous, metadata=self.metadata)

    async def end(self, session_id: str, stats: dict[str, int]) -> None:
        def write() -> None:
            with self.store.store.batch():
                self.store.store.end_session(session_id)
                setter = getattr(self.store.store, "set_session_stats", None)
                if setter is not None:
                    setter(session_id, stats)

        await self.store.call(write)

    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]:
        return await self.store.call(self.store.store.recent_turns, chain, limit)


def link_policy(settings: Settings) -> LinkPolicy:
    return LinkPolicy(
        session_max_seconds=settings.session_max_minutes * 60,
        context_turns=settings.context_turns,
        duplex=settings.duplex,
        echo_tail=settings.echo_tail_ms / 1000,
        barge_in_dbfs=settings.barge_in_dbfs,
    )


async def converse(
    settings: Settings,
    source: Source,
    sink: Sink,
    *,
    url: str | None = None,
    console: Console | None = None,
    stopper: Stopper | None = None,
    on_configured: Callable[[], None] | None = None,
    metadata: dict[str, Any] | None = None,
    policy: LinkPolicy | None = None,
) -> Outcome:
    """One conversation from ``source`` to ``sink``, every transcript stored as it arrives."""
    started = time.monotonic()
    store = AsyncStore(await trio.to_thread.run_sync(Store.open, settings.db))
    backend = "local" if settings.backend == "local" and url is None else settings.backend
    sessions = StoreSessions(store, backend=backend, model=settings.model, voice=settings.voice,
                             metadata=metadata or {})
    ctx: Context | None = None
    try:
        async with open_endpoint(settings, url) as endpoint:
            ctx = await run_conversation(
                endpoint, session_config(settings), source, sink, sessions, store.record,
                console=console, stopper=stopper, on_configured=on_configured,
                policy=policy or link_policy(settings),
            )
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await store.call(store.store.record_error, None, source="local",
                             type=type(exc).__name__, code=None, message=str(exc)[:500])
        raise
    finally:
        with trio.CancelScope(shield=True):
            await store.call(store.store.close)
    return Outcome(ctx.session_ids[0] if ctx and ctx.session_ids else "-", ctx,
                   time.monotonic() - started)


class TextConsole:
    """Prints ``you: …`` / ``r2: …`` as transcripts arrive, and a progress bar on a terminal."""

    def __init__(self, out: Any = None, err: Any = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = bool(getattr(self.err, "isatty", lambda: False)())
        self._bar = False
        self._status = ""

    def transcript(self, role: str, text: str) -> None:
        self.finish()
        who = "you" if role == "user" else "r2"
        print(f"{who}: {text}", file=self.out, flush=True)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            log.debug("status: %s", text)

    def progress(self, fraction: float) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * fraction)
        self.err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} ")
        self.err.flush()
        self._bar = True

    def finish(self) -> None:
        if self._bar:
            self.err.write("\r" + " " * 40 + "\r")
            self.err.flush()
            self._bar = False


def default_out_path(input_path: Path) -> Path:
    return Path.cwd() / f"{input_path.stem}.reply.wav"
