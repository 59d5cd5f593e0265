"""Composes a run from the settings: service endpoint (see endpoints.py), store and shipper,
tools, session gate (with the budget around it, budget.py, and the listening switch,
switch.py), metrics (watching.py), the event stream and what follows it (body.py), the link's
parts — built once, then :func:`run_pipeline`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.appliance.body import RunCommands, open_body, plan_body, volume_only
from r2d2voice.appliance.budget import BudgetGate
from r2d2voice.appliance.context import Console, LinkPolicy, Sink, Source, Stopper
from r2d2voice.appliance.endpoints import open_endpoint, plan_service
from r2d2voice.appliance.gate import AlwaysGate, WakeGate, WakeTrigger, WakeWordConversation
from r2d2voice.appliance.pipeline import Run, RunResult, run_pipeline
from r2d2voice.appliance.protocols import check_duplex, core_factory
from r2d2voice.appliance.signals import SIGNAL_REASONS
from r2d2voice.appliance.switch import ListeningSwitch
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.appliance.tools.builtins import Volume
from r2d2voice.appliance.tools.memory_brief import with_memory
from r2d2voice.appliance.tools.offer import open_toolbox as offered_tools
from r2d2voice.appliance.watching import watch_run
from r2d2voice.audio.echo import resolve_mode
from r2d2voice.audio.wake import WakeWordDetector
from r2d2voice.errors import ConfigError, UsageError
from r2d2voice.link.parts import LinkParts
from r2d2voice.link.state import Quiet
from r2d2voice.link.transport import Connector, open_realtime
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.reports.budget import Caps, read_spent
from r2d2voice.reports.usage import Prices
from r2d2voice.storage.recorder import (
    CLOSE_DEADLINE,
    AsyncStore,
    StoreStatus,
    open_store,
    store_options,
)
from r2d2voice.storage.shipping.alongside import plan_shipping, ship_alongside
from r2d2voice.system.config import Settings
from r2d2voice.system.events import Events

if TYPE_CHECKING:
    from r2d2voice.audio.availability import DeviceStates
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
    """The tools of ``R2D2_TOOLS`` (ConfigError, exit 3, for a bad file; the volume is kept
    next to the database; ``${VAR}`` of MCP entries filled from the environment or env file)
    and the memory's (``R2D2_MEMORY``). None with neither."""
    from r2d2voice.appliance.tools.mcp.config import variables

    return offered_tools(settings, state_path=Path(settings.db).parent / TOOL_STATE_FILE,
                         variables=variables(settings.env_file))


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
        max_output_tokens=settings.max_output_tokens,
        noise_reduction=None if settings.noise_reduction == "off" else settings.noise_reduction,
        turn_detection=settings.turn_detection,
        eagerness=settings.vad_eagerness,
    )


@dataclass
class Outcome:
    session_id: str
    result: RunResult | None
    wall_seconds: float
    #: the recorder's last state (closed): ``lost`` records were never written
    store: StoreStatus | None = None
    #: the budget's gate (None: no cap): its ``stop`` says whether it ended a file's run
    budget: BudgetGate | None = None
    #: USD this run spent (estimated as ``usage`` does)
    spent: float = 0.0

    @property
    def conversations(self) -> list[WakeWordConversation]:
        return self.result.conversations if self.result else []

    @property
    def session_ids(self) -> list[str]:
        return list(self.result.session_ids) if self.result else []

    @property
    def assistant_turns(self) -> int:
        return self.result.stats.assistant_turns if self.result else 0


class StoreSessions:
    """Service sessions as rows in the store: one per connection, chained after reconnects."""

    def __init__(self, store: AsyncStore, *, backend: str, model: str, voice: str,
                 metadata: dict[str, Any]) -> None:
        self.store = store
        self.backend, self.model, self.voice = backend, model, voice
        self.metadata = metadata

    async def begin(self, previous: str | None, metadata: dict[str, Any]) -> str:
        return await self.store.start_session(
            backend=self.backend, model=self.model, voice=self.voice,
            previous_session_id=previous, metadata={**self.metadata, **metadata})

    async def end(self, session_id: str, stats: dict[str, int]) -> None:
        await self.store.end_session(session_id, stats)

    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]:
        return await self.store.recent_turns(chain, limit)


@dataclass
class RunOptions:
    """What a command adds to the settings for one run (all optional)."""

    url: str | None = None
    console: Console = field(default_factory=Quiet)
    stopper: Stopper = field(default_factory=Stopper)
    #: keys every session row carries (the command, the file or devices)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the service accepted the first session's configuration
    on_configured: Callable[[], None] | None = None
    #: external wakes (``r2d2voice wake``), with ``R2D2_LISTEN=wake``
    trigger: WakeTrigger | None = None
    #: the model's tools (default: those of ``settings.tools``, if any)
    toolbox: Toolbox | None = None
    policy: LinkPolicy | None = None
    #: opens the transport (a websocket; tests may slow it down or keep it in memory)
    connect: Connector = open_realtime
    #: the recorder's state as it changes (a full disk, records waiting)
    on_store_status: Callable[[StoreStatus], None] | None = None
    #: the fleet shipper's, after each attempt (``R2D2_SHIP_URL``)
    on_ship_status: Callable[[ShipStatus], None] | None = None
    #: the budget closed (the STATUS= text saying so) or opened again (None)
    on_budget: Callable[[str | None], None] | None = None
    #: the sound devices the run waits for (their presence is a metric)
    devices: DeviceStates | None = None
    #: the wall clock (aware): the store's labels and the budget's days (tests move it with
    #: trio's clock); None: the system's
    wall_clock: Callable[[], datetime] | None = None
    #: a wake from a remote (MQTT's wake button), as ``r2d2voice wake`` does it (None: the
    #: trigger's, if any; a replay has neither)
    on_wake: Callable[[], object] | None = None
    #: the run's event stream (default: a new hub; a test may follow its own)
    events: Events | None = None


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


async def hold(settings: Settings, source: Source, sink: Sink,
               options: RunOptions | None = None) -> Outcome:
    """A whole run from ``source`` to ``sink``, however it listens (``R2D2_LISTEN``): every
    transcript stored as it arrives, shipped alongside with ``R2D2_SHIP_URL`` (one shipper for
    the run, which ships once more at the end unless a signal stopped it: the next run sends
    the rest). A missing key, a bad tools file, bad fleet settings, an unknown wake word, a
    full-duplex model behind the half-duplex gate or a database that is not ours fail before
    anything starts."""
    options = options or RunOptions()
    started = trio.current_time()
    service = plan_service(settings, options.url)  # a missing key fails here, first
    check_duplex(service, settings, live_source=source.live)
    ship_plan = plan_shipping(settings.db, settings.ship_url, settings.device_id)  # idem
    body = plan_body(settings)  # idem: hooks, MQTT
    toolbox = options.toolbox if options.toolbox is not None else open_toolbox(settings)
    if toolbox is None and body.remote:
        toolbox = volume_only(settings)
    hub = options.events or Events(privacy=not settings.store_text)
    gate = _gate(settings, source, options, hub)
    budget = _budget(settings, gate, source, options, hub)
    # a remote may switch listening off: the outermost policy (off, not even the budget hears)
    switch = (ListeningSwitch(budget or gate, trigger=options.trigger) if body.remote
              else None)
    commands = RunCommands(toolbox.volume if toolbox else Volume(None),
                           _on_wake(options), switch, settings)
    result: RunResult | None = None
    stopper = options.stopper
    try:
        # metrics first (a busy address fails before anything opens), and the event stream's
        # followers (they outlive the rest); the store retries while the disk is full, and
        # prunes with R2D2_RETENTION_DAYS; the shipper runs in threads of its own (never
        # waited for); both are closed on the way out, shielded, with a deadline. The MCP
        # servers run for the whole run (one process each, however it listens), their tools
        # offered as each becomes ready
        async with (watch_run(settings, budget=budget, devices=options.devices) as watching,
                    open_body(body, hub, commands),
                    open_store(settings.db, on_status=options.on_store_status,
                               **_clock(options), **store_options(settings)) as store,
                    ship_alongside(ship_plan, status=options.on_ship_status) as shipping,
                    toolbox.running() if toolbox is not None else nullcontext()):
            watching.store = store
            sessions = StoreSessions(store, backend=service.backend, model=service.model,
                                     voice=service.voice or settings.voice,
                                     metadata=options.metadata)
            if isinstance(gate, WakeGate):
                gate.annotate = store.update_session_metadata
                gate.on_wake = watching.on_wake
            if budget is not None:
                prices = Prices.from_settings(settings)
                budget.read = lambda now: read_spent(store, prices, now,
                                                     bill_local=settings.bill_local)
            try:
                async with open_endpoint(service) as endpoint:
                    parts = watching.parts = LinkParts(
                        endpoint, session_config(settings, toolbox), source, sessions,
                        switch or budget or gate, connect=options.connect,
                        policy=options.policy or link_policy(settings, source),
                        console=_console(gate, options.console),
                        on_configured=options.on_configured,
                        configure=lambda config: with_memory(config, settings),
                        protocol=core_factory(service, settings),
                        on_record=watching.on_record, on_connection=watching.on_connection,
                        events=hub)
                    result = await run_pipeline(Run(parts, source, sink, store.record,
                                                    stopper=stopper, toolbox=toolbox))
            except BaseException as exc:
                # a cancelled run (a signal, a timeout) is no error, and a setting the service
                # refused (a rejected key) is the configuration's, not the session's
                if not _cancelled(exc) and not _of_type(exc, (ConfigError, UsageError)):
                    with trio.move_on_after(CLOSE_DEADLINE) as scope:
                        scope.shield = True
                        await store.record_error(None, source="local",
                                                 type=type(exc).__name__, code=None,
                                                 message=str(exc)[:500])
                raise
            if shipping is not None and stopper.reason not in SIGNAL_REASONS:
                await shipping.finish()  # what the run wrote last; bounded
    finally:
        if isinstance(gate, WakeGate):
            gate.detector.close()
    return Outcome(result.session_id if result else "-", result,
                   trio.current_time() - started, store.status, budget, watching.spent)


def _gate(settings: Settings, source: Source, options: RunOptions,
          events: Events) -> AlwaysGate | WakeGate:
    if settings.listen != "wake":
        return AlwaysGate(live=source.live, console=options.console, events=events,
                          vad=(settings.vad_threshold, settings.vad_prefix_ms,
                               settings.vad_silence_ms))
    check_listening(settings)
    detector = WakeWordDetector(settings.wake_word)
    log.info("listening for %r on the board: nothing is sent until it is heard",
             detector.wake_word)
    gate = WakeGate(detector, idle_s=settings.conversation_idle_s, wake_word=settings.wake_word,
                    console=options.console, trigger=options.trigger,
                    earcons=settings.earcons, events=events)
    options.console.status(gate.waiting_status)
    return gate


def _on_wake(options: RunOptions) -> Callable[[], object] | None:
    """What a remote's wake does: the command's, else the wake gate's trigger (None: a
    replay, which hears only its file)."""
    if options.on_wake is not None:
        return options.on_wake
    return options.trigger.wake if options.trigger is not None else None


def _budget(settings: Settings, gate: AlwaysGate | WakeGate, source: Source,
            options: RunOptions, events: Events) -> BudgetGate | None:
    """The budget around ``gate`` (None without a cap)."""
    caps = Caps.from_settings(settings)
    if not caps.any:
        return None
    budget = BudgetGate(gate, caps, live=source.live, console=options.console,
                        earcons=settings.earcons, events=events, **_clock(options))
    budget.on_change = options.on_budget
    return budget


def _clock(options: RunOptions) -> dict[str, Callable[[], datetime]]:
    return {"now": options.wall_clock} if options.wall_clock is not None else {}


def _console(gate: AlwaysGate | WakeGate, console: Console) -> Console:
    """The link's console: during a woken conversation its statuses say so."""
    if not isinstance(gate, WakeGate):
        return console

    class InConversation:
        def transcript(self, role: str, text: str) -> None:
            console.transcript(role, text)

        def status(self, text: str) -> None:
            console.status(f"in conversation ({text})")

    return InConversation()


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
