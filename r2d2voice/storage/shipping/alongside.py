"""Shipping alongside a conversation: ``run`` and ``replay`` with ``R2D2_SHIP_URL`` set.

:func:`plan_shipping` checks the settings before anything starts (a fleet URL libpq cannot
parse, a device id that is not one: :class:`~r2d2voice.errors.ConfigError`, exit 3).
:func:`ship_alongside` runs :func:`~r2d2voice.storage.shipping.forever.ship_forever` as a
task of its own next to the conversation (worker threads under its own limiter: the
conversation never waits for it); :meth:`Shipping.finish` ships once more at the end, at most
:data:`FINAL_DEADLINE` seconds. Leaving the block cancels the task, which closes within
:data:`~r2d2voice.storage.shipping.forever.CLOSE_DEADLINE` seconds.

Cheap to import: psycopg is loaded only when shipping is configured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from r2d2voice.storage.shipping.forever import ShipStatus

__all__ = ["FINAL_DEADLINE", "RUN_BATCH", "ShipPlan", "Shipping", "plan_shipping",
           "ship_alongside"]

log = logging.getLogger("r2d2voice.storage.shipping.alongside")

#: Seconds the last ship at the end of a replay may take; the rest ships next time.
FINAL_DEADLINE = 5.0
#: Rows per batch next to a conversation: smaller than ``ship``'s, so that the worker thread
#: hands the GIL back sooner (bench/README.md: event-loop lag while shipping).
RUN_BATCH = 1000


@dataclass(frozen=True)
class ShipPlan:
    """What to ship where: checked settings."""

    db_path: str
    url: str
    device_id: str


def plan_shipping(db_path: str | os.PathLike[str], url: str | None, device_id: str | None,
                  *, what: str = "R2D2_SHIP_URL") -> ShipPlan | None:
    """The plan for ``R2D2_SHIP_URL`` (``what`` names it in errors) and ``R2D2_DEVICE_ID``
    (None: the hostname); None when no URL is set. Raises :class:`ConfigError` (exit 3) for a
    URL or device id no retry can fix."""
    if not url:
        return None
    from r2d2voice.storage.shipping.device import resolve_device_id
    from r2d2voice.storage.shipping.url import is_fleet_url, parse_fleet_url

    if not is_fleet_url(url):
        raise ConfigError(f"{what} must be a postgresql:// URL")
    try:
        parse_fleet_url(url)
    except UsageError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return ShipPlan(os.fspath(db_path), url, resolve_device_id(device_id))


class Shipping:
    """The shipping task of one conversation (see :func:`ship_alongside`)."""

    def __init__(self, plan: ShipPlan,
                 status: Callable[[ShipStatus], None] | None = None) -> None:
        self.plan = plan
        self.status: ShipStatus | None = None  # the last attempt's outcome
        self._on_status = status
        self._finish = trio.Event()
        self._done = trio.Event()

    def _seen(self, status: ShipStatus) -> None:
        self.status = status
        if self._on_status is not None:
            self._on_status(status)

    async def run(self, **options: Any) -> None:
        """Ship until cancelled or finished (options: :func:`ship_forever`'s)."""
        from r2d2voice.storage.shipping.forever import ship_forever

        try:
            await ship_forever(self.plan.db_path, self.plan.url, self.plan.device_id,
                               status=self._seen, finish=self._finish, **options)
        finally:
            self._done.set()

    async def finish(self, deadline: float = FINAL_DEADLINE) -> ShipStatus | None:
        """Ship what was written last, now, waiting at most ``deadline`` seconds; log the
        outcome. Returns the last status (None: no attempt ended)."""
        if not self._done.is_set():
            self._finish.set()
            with trio.move_on_after(deadline):
                await self._done.wait()
        status = self.status
        if not self._done.is_set():
            log.warning("fleet: the last ship took over %g s; the rest ships next time",
                        deadline)
        elif status is not None and status.state == "ok" and status.last is not None:
            log.info("fleet: up to date on %s as device '%s' (%d rows shipped)",
                     status.last.server, status.last.device_id, status.shipped)
        elif status is not None and status.state == "waiting":  # the reason is logged
            log.warning("fleet: not shipped this time; the next run or `r2d2voice ship` "
                        "sends it")
        return status


@asynccontextmanager
async def ship_alongside(plan: ShipPlan | None, *,
                         status: Callable[[ShipStatus], None] | None = None,
                         **options: Any) -> AsyncIterator[Shipping | None]:
    """Ship ``plan`` (None: nothing; yields None) in a task of its own while the block runs;
    cancelled, and closed within its deadline, on the way out. ``status`` gets every
    attempt's :class:`ShipStatus`; ``options`` go to :func:`ship_forever` (tests)."""
    if plan is None:
        yield None
        return
    shipping = Shipping(plan, status)
    options.setdefault("batch", RUN_BATCH)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: shipping.run(**options), name="ship_forever")
        try:
            yield shipping
        finally:
            nursery.cancel_scope.cancel()
