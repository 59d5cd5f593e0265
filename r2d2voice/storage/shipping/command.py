"""``r2d2voice ship --to postgresql://… [--db PATH] [--follow]``: the command's body (the CLI
parses the options and maps :class:`~r2d2voice.errors.R2Error` to its one line and exit code).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TextIO

import trio

from r2d2voice.errors import UsageError
from r2d2voice.storage.shipping.alongside import plan_shipping
from r2d2voice.storage.shipping.forever import SHIP_EVERY, ShipStatus, ship_forever
from r2d2voice.storage.shipping.shipper import DEFAULT_BATCH, ship_once

__all__ = ["ship_command"]


def ship_command(db: str | os.PathLike[str], url: str, follow: bool = False,
                 device_id: str | None = None, out: TextIO | None = None, *,
                 batch: int = DEFAULT_BATCH, every: float = SHIP_EVERY) -> None:
    """Ship the database ``db`` to the fleet server ``url`` as ``device_id`` (None: the
    hostname) and print what was shipped. ``follow``: ship again every ``every`` seconds, retrying
    with backoff while the server is down, until SIGINT or SIGTERM (then return: exit 0).

    Raises one-line errors: :class:`UsageError` (exit 2) for a missing database,
    ``FleetUnavailable`` (exit 1) for a server down without ``follow``, :class:`ConfigError`
    (exit 3) for a fleet URL libpq cannot parse, a bad device id or ``FleetSchemaTooNew`` (as
    the CLI's own check of ``--to`` / ``R2D2_SHIP_URL``).
    """
    out = out or sys.stdout
    plan = plan_shipping(db, url, device_id, what="the fleet URL (--to, R2D2_SHIP_URL)")
    if plan is None:
        raise UsageError("ship: say where to: --to postgresql://… or R2D2_SHIP_URL")
    path, device = plan.db_path, plan.device_id
    if not os.path.exists(path):
        raise UsageError(f"no such database: {path}")
    if not follow:
        out.write(f"{ship_once(path, url, device, batch=batch)}\n")
        return
    trio.run(_follow, path, url, device, out, batch, every)


async def _follow(path: str, url: str, device: str, out: TextIO, batch: int,
                  every: float) -> None:
    # Prints the first report, every report that shipped something, each new failure once,
    # and the report that ends a failure.
    quiet: list[str | None] = [""]  # the failure printed last ("": none yet, at start)

    def status(state: ShipStatus) -> None:
        if state.state == "ok":
            if state.last is not None and (state.last.total or quiet[0] is not None):
                out.write(f"{state.last}\n")
            quiet[0] = None
        elif state.state == "waiting" and state.reason != quiet[0]:
            out.write(f"{state}\n")
            quiet[0] = state.reason
        out.flush()

    error = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def until_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(until_signal)
            error = await ship_forever(path, url, device, status=status, batch=batch,
                                       every=every)
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error  # shipping cannot go on (a newer server schema)
