"""SIGINT/SIGTERM for the long-running commands: the first stops gracefully, a second hard."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.errors import R2Error, RuntimeFailure

log = logging.getLogger("r2d2voice")
T = TypeVar("T")

#: ``Stopper.reason`` after each signal: the signal's name.
SIGNAL_REASONS = {signal.SIGINT.name: signal.SIGINT, signal.SIGTERM.name: signal.SIGTERM}


class Interrupted(R2Error):
    """A command a signal ended before it was done: exit 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def stopped_by_signal(stopper: Stopper) -> signal.Signals | None:
    """The signal that stopped the run (see :func:`with_signals`), or None."""
    return SIGNAL_REASONS.get(stopper.reason or "")


async def with_signals(stopper: Stopper, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body``; the first SIGINT/SIGTERM calls ``stopper.stop("SIGINT")`` (or
    ``"SIGTERM"``: the run drains and ``body`` returns), a second one cancels ``body``
    (RuntimeFailure, exit 1). The stopper's hooks run before the log line says so (a progress
    bar can clear itself first)."""
    result: list[T] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stopper.reason is None:
                        stopper.stop(name)
                        log.info("%s: finishing up", name)
                    else:
                        log.warning("%s again: stopping now", name)
                        nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        result.append(await body())
        nursery.cancel_scope.cancel()
    if not result:
        raise RuntimeFailure("stopped by a second signal")
    return result[0]
