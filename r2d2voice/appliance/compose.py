"""Composes a run: service endpoint (OpenAI or the embedded local backend), store, pipeline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from r2d2voice.appliance.context import Console, Context, LinkPolicy, Sink, Source, Stopper
from r2d2voice.appliance.pipeline import run_conversation
from r2d2voice.link.transport import Endpoint
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.storage.recorder import CLOSE_DEADLINE, AsyncStore
from r2d2voice.system.config import Settings

log = logging.getLogger("r2d2voice.appliance.compose")


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


def session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
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
        return await self.store.start_session(
            backend=self.backend, model=self.model, voice=self.voice,
            previous_session_id=previous, metadata=self.metadata)

    async def end(self, session_id: str, stats: dict[str, int]) -> None:
        await self.store.end_session(session_id, stats)

    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]:
        return await self.store.recent_turns(chain, limit)


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
    started = trio.current_time()
    store = await AsyncStore.open(settings.db)
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
        if not _cancelled(exc):  # a cancelled run (a signal, a timeout) is no error
            with trio.move_on_after(CLOSE_DEADLINE) as scope:
                scope.shield = True
                await store.record_error(None, source="local", type=type(exc).__name__,
                                         code=None, message=str(exc)[:500])
        raise
    finally:
        await store.aclose()  # shielded, with a deadline
    return Outcome(ctx.session_ids[0] if ctx and ctx.session_ids else "-", ctx,
                   trio.current_time() - started)


def _cancelled(exc: BaseException) -> bool:
    """``exc`` is trio's Cancelled, or a group of nothing else."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return isinstance(exc, trio.Cancelled)
    return all(_cancelled(e) for e in inner)
