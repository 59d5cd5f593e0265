"""``run`` and ``replay`` with ``R2D2_LISTEN=wake``: the checks ``always`` mode makes before
its first frame, made before the first frame here too, and one fleet shipper for the whole run.

In ``always`` mode :func:`~r2d2voice.appliance.compose.converse` ships alongside its one long
conversation. A woken run holds many short ones and waits between them, often for hours: one
shipper per conversation would stop retrying while the robot waits, and its last ship (up to
5 s against an unreachable server) would hold up the next wake's connection. So here the
shipper runs from start to stop, and the conversations are composed without one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from r2d2voice.appliance.compose import open_toolbox
from r2d2voice.appliance.context import Console, Sink, Source, Stopper
from r2d2voice.appliance.endpoints import plan_service
from r2d2voice.appliance.listening import Listening, WakeTrigger, listen_for_wake
from r2d2voice.appliance.signals import SIGNAL_REASONS
from r2d2voice.storage.recorder import AsyncStore
from r2d2voice.storage.shipping.alongside import plan_shipping, ship_alongside
from r2d2voice.system.config import Settings

if TYPE_CHECKING:
    from r2d2voice.storage.recorder import StoreStatus
    from r2d2voice.storage.shipping.forever import ShipStatus

__all__ = ["listen"]


async def listen(settings: Settings, source: Source, sink: Sink, *, url: str | None,
                 console: Console, stopper: Stopper, metadata: dict[str, Any],
                 trigger: WakeTrigger | None = None,
                 on_store_status: Callable[[StoreStatus], None] | None = None,
                 on_ship_status: Callable[[ShipStatus], None] | None = None) -> Listening:
    """:func:`listen_for_wake` on ``source`` until it ends or ``stopper`` fires. A missing key,
    a bad tools file, bad fleet settings or a database that is not ours fail now, not at the
    first wake (one toolbox serves every conversation). With ``R2D2_SHIP_URL``, one shipper
    runs for the whole run (``on_ship_status`` after each attempt) and ships once more at the
    end unless a signal stopped the run (the next run sends the rest)."""
    plan_service(settings, url)
    toolbox = open_toolbox(settings)
    plan = plan_shipping(settings.db, settings.ship_url, settings.device_id)
    # the database exists before the first wake (an unusable one fails now, as in always
    # mode), so the shipper has something to read while the robot waits
    store = await AsyncStore.open(settings.db, store_text=settings.store_text)
    await store.aclose()
    # MCP servers run for the whole run (one process each), not one per conversation
    async with (ship_alongside(plan, status=on_ship_status) as shipping,
                toolbox.running() if toolbox is not None else nullcontext()):
        outcome = await listen_for_wake(
            settings, source, sink, url=url, console=console, stopper=stopper,
            trigger=trigger, metadata=metadata, toolbox=toolbox,
            on_store_status=on_store_status, ship=False)
        if shipping is not None and stopper.reason not in SIGNAL_REASONS:
            await shipping.finish()  # what the last conversation wrote; bounded
    return outcome
