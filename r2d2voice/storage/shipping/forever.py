"""Shipping as a task of its own: ``run`` with ``R2D2_SHIP_URL``, and ``ship --follow``.

Every SQLite and psycopg call runs in a worker thread (``trio.to_thread``) under the task's own
``CapacityLimiter(1)``, never on the event loop and never sharing the recorder's limiter, so
the conversation is neither blocked nor slowed. A ship every :data:`SHIP_EVERY` seconds; when
the server (or the database) cannot be used, retries back off from 1 s, doubling, to 60 s,
and resume where the watermarks stopped: nothing is lost. A server whose schema is newer than
this code stops shipping for good (logged once), without ending the run.

Cancellation is prompt: the thread in flight is abandoned at once and told to stop after its
batch (whose transaction commits or rolls back as a whole); closing waits for it at most
:data:`CLOSE_DEADLINE` seconds, shielded. Setting the ``finish`` event asks for one last ship
at once (a replay's end): the task returns after it, whatever its outcome.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

from r2d2voice.errors import ConfigError, R2Error
from r2d2voice.storage.health import StoreUnavailable
from r2d2voice.storage.pending import Backoff
from r2d2voice.storage.shipping.errors import FleetRejected, FleetUnavailable
from r2d2voice.storage.shipping.shipper import DEFAULT_BATCH, Shipper, ShipReport

__all__ = ["CLOSE_DEADLINE", "SHIP_EVERY", "STOPPED_NOTE", "ShipFunction", "ShipStatus",
           "ship_forever"]

log = logging.getLogger("r2d2voice.storage.shipping.forever")

#: Seconds between two ships while the server is reachable.
SHIP_EVERY = 5.0
#: Seconds closing may wait for the batch in flight (shielded from cancellation).
CLOSE_DEADLINE = 2.0
#: One ship, run in a worker thread: stop after the batch in flight once the event is set.
ShipFunction = Callable[[threading.Event], ShipReport]


@dataclass(frozen=True)
class ShipStatus:
    """The shipper's state: ``ok`` (the last ship succeeded), ``waiting`` (it failed;
    ``reason`` says why, the next try is ``retry_in`` seconds away) or ``stopped`` (for good:
    ``reason``). ``shipped`` counts rows sent since the task started; ``note`` is what a
    status line adds ("" while all is well), short and steady across retries."""

    state: str
    shipped: int = 0
    last: ShipReport | None = None
    reason: str | None = None
    retry_in: float | None = None
    note: str = ""

    def __str__(self) -> str:
        if self.state == "ok":
            return f"fleet: up to date ({self.shipped} rows shipped)"
        if self.state == "waiting":
            return f"fleet: {self.reason}; retrying in {self.retry_in:g} s"
        return f"fleet: shipping stopped: {self.reason}"


async def ship_forever(
    db_path: str | os.PathLike[str],
    url: str,
    device_id: str | None,
    *,
    status: Callable[[ShipStatus], None] | None = None,
    every: float = SHIP_EVERY,
    backoff: Backoff | None = None,
    batch: int = DEFAULT_BATCH,
    ship: ShipFunction | None = None,
    finish: trio.Event | None = None,
) -> R2Error | None:
    """Ship the database at ``db_path`` to ``url`` as ``device_id`` (None: the hostname)
    until cancelled, or until the attempt made once ``finish`` is set.

    ``status`` is called (in the trio thread) after every attempt. Returns the error, already
    logged, when shipping cannot go on whatever happens (a newer server schema, a malformed
    URL, a bad device id): the run goes on. Returns None after the ``finish`` attempt.
    ``ship`` replaces the real shipper (tests).
    """
    def report(state: ShipStatus) -> None:
        if status is not None:
            status(state)

    try:
        shipper = Shipper(db_path, url, device_id, batch=batch) if ship is None else None
    except R2Error as exc:  # a malformed URL, a bad device id: no retry can fix it
        log.error("shipping stopped: %s", exc)
        report(ShipStatus("stopped", reason=str(exc), note=STOPPED_NOTE))
        return exc
    fn: ShipFunction = ship or shipper.ship  # type: ignore[union-attr]
    backoff = backoff or Backoff()
    limiter = trio.CapacityLimiter(1)  # this task's own: never waits on the recorder's
    stop = threading.Event()
    shipped = 0
    failing: str | None = None
    finish = trio.Event() if finish is None else finish
    try:
        while True:
            final = finish.is_set()
            try:
                last = await trio.to_thread.run_sync(fn, stop, limiter=limiter,
                                                     abandon_on_cancel=True)
            except ConfigError as exc:  # FleetSchemaTooNew, a bad device id: waiting won't fix
                log.error("shipping stopped: %s", exc)
                report(ShipStatus("stopped", shipped, reason=str(exc), note=STOPPED_NOTE))
                return exc
            except Exception as exc:  # the robot goes on; retry later
                delay = backoff.next_delay()
                reason = str(exc) if isinstance(exc, R2Error) else f"{type(exc).__name__}: {exc}"
                if reason != failing:
                    if isinstance(exc, R2Error):
                        log.warning("%s; retrying with backoff", reason)
                    else:
                        log.exception("shipping failed unexpectedly; retrying with backoff")
                    failing = reason
                report(ShipStatus("waiting", shipped, reason=reason, retry_in=delay,
                                  note=_waiting_note(exc)))
                if final:
                    return None
                await _pause(delay, finish)
                continue
            backoff.reset()
            shipped += last.total
            if failing is not None:
                log.info("shipping again: %s", last)
                failing = None
            elif last.total:
                log.debug("%s", last)
            report(ShipStatus("ok", shipped, last))
            if final:
                return None
            await _pause(every, finish)
    finally:
        stop.set()
        if shipper is not None:
            with trio.move_on_after(CLOSE_DEADLINE) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(shipper.close, limiter=limiter,
                                              abandon_on_cancel=True)


#: :attr:`ShipStatus.note` once shipping stopped for good (the log says why).
STOPPED_NOTE = "fleet shipping stopped (see the log)"


def _waiting_note(exc: Exception) -> str:
    if isinstance(exc, FleetUnavailable):
        return "fleet server unreachable, retrying"
    if isinstance(exc, FleetRejected):
        return "fleet server refuses the data, retrying"
    if isinstance(exc, StoreUnavailable):
        return "shipping waits for the database"
    return "shipping failed, retrying"


async def _pause(seconds: float, finish: trio.Event) -> None:
    """Sleep ``seconds``, or less if ``finish`` is set meanwhile."""
    with trio.move_on_after(seconds):
        await finish.wait()
