"""Composes a run: service endpoint (see endpoints.py), store, pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import trio

from r2d2voice.appliance.context import Console, Context, LinkPolicy, Sink, Source, Stopper
from r2d2voice.appliance.endpoints import open_endpoint, plan_service
from r2d2voice.appliance.pipeline import run_conversation
from r2d2voice.appliance.signals import SIGNAL_REASONS
from r2d2voice.appliance.tools import Toolbox, load_tools
from r2d2voice.audio.echo import resolve_mode
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.errors import ConfigError, UsageError
from r2d2voice.link.transport import Connector, open_realtime
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.storage.recorder import (
    CLOSE_DEADLINE,
    AsyncStore,
    StoreStatus,
    open_store,
    store_options,
)
from r2d2voice.storage.shipping.alongside import plan_shipping, ship_alongside
from r2d2voice.system.config import Settings

if TYPE_CHECKING:
    from r2d2voice.storage.shipping.forever import ShipStatus

log = logging.getLogger("r2d2voice.appliance.compose")

#: the tools' persistent state (the volume), next to the database
TOOL_STATE_FILE = "tool_state.json"


def check_listening(settings: Settings) -> None:
    """With ``R2D2_LISTEN=wake``, the wake word must name a model: ConfigError (exit 3) naming
    the key and listing the bundled words otherwise. Always listening needs nothing."""
    if settings.listen != "wake":
        return
    from r2d2voice.audio.wake import model_config

    try:
        model_config(settings.wake_word)
    except ConfigError as exc:
        if "pymicro-wakeword" in str(exc):
            raise  # not the word: the engine is missing
        raise ConfigError(f"R2D2_WAKE_WORD {settings.where('wake_word')}: {exc}") from None


def open_toolbox(settings: Settings) -> Toolbox | None:
    """The tools of ``R2D2_TOOLS`` (ConfigError, exit 3, for a bad file); the volume is kept
    next to the database. None without a tools file."""
    if not settings.tools:
        return None
    return load_tools(settings.tools, state_path=Path(settings.db).parent / TOOL_STATE_FILE)


def session_config(settings: Settings, toolbox: Toolbox | None = None) -> SessionConfig:
    return SessionConfig(
        tools=tuple(toolbox.session_tools()) if toolbox is not None else (),
        instructions=settings.instructions,
        voice=settings.voice,
        transcribe_model=settings.transcribe_model,
        vad_threshold=settings.vad_threshold,
        vad_prefix_ms=settings.vad_prefix_ms,
        vad_silence_ms=settings.vad_silence_ms,
        retention_ratio=settings.truncation_ratio,
        token_limit=settings.context_token_limit or None,
        noise_reduction=None if settings.noise_reduction == "off" else settings.noise_reduction,
        turn_detection=settings.turn_detection,
        eagerness=settings.vad_eagerness,
    )


@dataclass
class Outcome:
    session_id: str
    ctx: Context | None
    wall_seconds: float
    #: the recorder's last state (closed): ``lost`` records were never written
    store: StoreStatus | None = None


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


class LinkOptions(TypedDict, total=False):
    """What :func:`converse` takes about the service, the link and the store, for a caller that
    holds conversations of its own and passes these on as they are (wake-word listening)."""

    url: str | None
    policy: LinkPolicy | None
    toolbox: Toolbox | None
    connect: Connector
    on_store_status: Callable[[StoreStatus], None] | None
    ship: bool


def link_policy(settings: Settings, source: object = None) -> LinkPolicy:
    """The link's policy from settings. Full duplex with ``R2D2_ECHO=off``, or with ``aec``
    when ``source`` has an echo canceller (``source.echo``); half duplex otherwise."""
    mode = resolve_mode(settings.echo_mode())
    cancelled = mode == "aec" and getattr(source, "echo", None) is not None
    return LinkPolicy(
        session_max_seconds=settings.session_max_minutes * 60,
        context_turns=settings.context_turns,
        duplex="full" if mode == "off" or cancelled else "half",
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
    toolbox: Toolbox | None = None,
    buffer: PlayoutBuffer | None = None,
    connect: Connector = open_realtime,
    on_store_status: Callable[[StoreStatus], None] | None = None,
    on_ship_status: Callable[[ShipStatus], None] | None = None,
    ship: bool = True,
) -> Outcome:
    """One conversation from ``source`` to ``sink``, every transcript stored as it arrives.
    ``toolbox``: the model's tools (default: those of ``settings.tools``, if any).
    ``buffer``: the playout buffer (wake-word listening keeps one for the whole run);
    ``connect``: opens the transport (a websocket; tests may slow it down);
    ``on_store_status``: the recorder's state as it changes (a full disk, records waiting);
    ``on_ship_status``: the fleet shipper's, after each attempt (``R2D2_SHIP_URL``);
    ``ship=False``: no shipper here, the caller runs one (wake-word listening: one for the
    whole run)."""
    started = trio.current_time()
    service = plan_service(settings, url)  # a missing key fails here, before the database
    ship_plan = (plan_shipping(settings.db, settings.ship_url, settings.device_id)  # idem
                 if ship else None)
    toolbox = toolbox if toolbox is not None else open_toolbox(settings)
    ctx: Context | None = None
    # retries while the disk is full, and prunes with R2D2_RETENTION_DAYS; closed on the
    # way out (shielded, with a deadline)
    # with R2D2_SHIP_URL, shipping runs as a task of its own next to the conversation (its
    # own threads: never waited for), cancelled and closed with a deadline on the way out
    async with (open_store(settings.db, on_status=on_store_status,
                           **store_options(settings)) as store,
                ship_alongside(ship_plan, status=on_ship_status) as shipping):
        sessions = StoreSessions(store, backend=service.backend, model=service.model,
                                 voice=settings.voice, metadata=metadata or {})
        try:
            async with open_endpoint(service) as endpoint:
                ctx = await run_conversation(
                    endpoint, session_config(settings, toolbox), source, sink, sessions,
                    store.record, console=console, stopper=stopper,
                    on_configured=on_configured, policy=policy or link_policy(settings, source),
                    toolbox=toolbox, buffer=buffer, connect=connect,
                )
        except BaseException as exc:
            # a cancelled run (a signal, a timeout) is no error, and a setting the service
            # refused (a rejected key) is the configuration's, not the session's
            if not _cancelled(exc) and not _of_type(exc, (ConfigError, UsageError)):
                with trio.move_on_after(CLOSE_DEADLINE) as scope:
                    scope.shield = True
                    await store.record_error(None, source="local", type=type(exc).__name__,
                                             code=None, message=str(exc)[:500])
            raise
        if shipping is not None and (stopper is None or stopper.reason not in SIGNAL_REASONS):
            await shipping.finish()  # what the conversation wrote last; bounded
    return Outcome(ctx.session_ids[0] if ctx and ctx.session_ids else "-", ctx,
                   trio.current_time() - started, store.status)


def _of_type(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """``exc``, or any exception inside it (a group from a nursery), is one of ``kinds``."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return isinstance(exc, kinds)
    return any(_of_type(e, kinds) for e in inner)


def _cancelled(exc: BaseException) -> bool:
    """``exc`` is trio's Cancelled, or a group of nothing else."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return isinstance(exc, trio.Cancelled)
    return all(_cancelled(e) for e in inner)
