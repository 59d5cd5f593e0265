"""What a run's budget and metrics see, from the run's own parts (``compose.hold`` wires it):

- every record as the link queues it (``LinkParts.on_record``): turns, responses, latencies and
  tool calls for the metrics, and each response's estimated cost (the formula ``usage`` uses;
  0 for a backend nobody bills) for ``r2d2voice_cost_usd_total`` and the budget's spend;
- each connection (``LinkParts.on_connection``): ``r2d2voice_connected``, and
  ``r2d2voice_reconnects_total{reason}`` labelled with how the connection it replaces ended
  (lost, expired, recycle);
- wakes (``WakeGate.on_wake``): ``r2d2voice_wakes_total{source}``;
- at every scrape, on the trio thread (:meth:`Metrics.sample_with`): the run's counters
  (capture drops, underruns), records waiting for the database, the budget left, the devices.

:func:`watch_run` serves the metrics with ``R2D2_METRICS`` for as long as the run lasts (a busy
or bad address: ConfigError, exit 3, before anything else starts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.appliance.budget import BudgetGate, billed
from r2d2voice.link.parts import Connected, LinkParts
from r2d2voice.protocol.actions import Record, StoreResponse
from r2d2voice.protocol.core import EndReason
from r2d2voice.reports.budget import response_cost
from r2d2voice.reports.usage import Prices
from r2d2voice.system.metrics import Metrics, serve_metrics

if TYPE_CHECKING:
    from r2d2voice.audio.availability import DeviceStates
    from r2d2voice.storage.recorder import AsyncStore

__all__ = ["Watching", "watch_run"]


class Watching:
    """One run's observers (see the module); ``metrics`` None: off."""

    def __init__(self, settings: Any, *, budget: BudgetGate | None = None,
                 metrics: Metrics | None = None) -> None:
        self.prices = Prices.from_settings(settings)
        self.billed = billed(settings)
        self.budget = budget
        self.metrics = metrics
        #: USD this run spent (estimated)
        self.spent = 0.0
        self.parts: LinkParts | None = None
        self.store: AsyncStore | None = None
        self.devices: DeviceStates | None = None

    def on_record(self, record: Record) -> None:
        if self.metrics is not None:
            self.metrics.observe(record)
        if not isinstance(record, StoreResponse) or record.usage is None:
            return
        cost = response_cost(record.usage, self.prices) if self.billed else 0.0
        self.spent += cost
        if self.metrics is not None:
            self.metrics.cost(cost)
        if self.budget is not None:
            self.budget.spent(cost)

    def on_connection(self, event: Connected | EndReason) -> None:
        if self.metrics is None:
            return
        self.metrics.connected(isinstance(event, Connected))
        if isinstance(event, Connected) and event.replaces is not None:
            self.metrics.reconnect(event.replaces.value)

    def on_wake(self, source: str) -> None:
        if self.metrics is not None:
            self.metrics.wake(source)

    def sample(self) -> None:
        """The values read at a scrape (trio thread)."""
        metrics = self.metrics
        if metrics is None:
            return
        counters = self.parts.counters() if self.parts is not None else {}
        metrics.capture_dropped(counters.get("frames_dropped", 0))
        metrics.underruns(counters.get("underruns", 0))
        if self.store is not None:  # held while the database cannot be written (a write
            # in progress is not "waiting")
            status = self.store.status
            metrics.store_waiting(status.waiting if status.state == "waiting" else 0)
        if self.budget is not None:  # (a closed budget notices a new day within a minute)
            metrics.budget_remaining(self.budget.state.remaining)
        if self.devices is not None:
            for kind in ("input", "output"):
                metrics.device_present(kind, not self.devices.is_waiting(kind))


@asynccontextmanager
async def watch_run(settings: Any, *, budget: BudgetGate | None,
                    devices: DeviceStates | None = None) -> AsyncIterator[Watching]:
    """The run's :class:`Watching`, its metrics served at ``settings.metrics`` (if set) until
    the block ends."""
    metrics = Metrics() if settings.metrics else None
    watching = Watching(settings, budget=budget, metrics=metrics)
    watching.devices = devices
    if metrics is None:
        yield watching
        return
    metrics.sample_with(watching.sample, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, settings.metrics, metrics)
        yield watching
        nursery.cancel_scope.cancel()

