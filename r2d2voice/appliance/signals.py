"""SIGINT/SIGTERM for the long-running commands: the first stops gracefully, a second hard."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.errors import RuntimeFailure

log = logging.getLogger("r2d2voice")
T = TypeVar("T")


async def with_signals(stopper: Stopper, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body``; the first SIGINT/SIGTERM calls ``stopper.stop("signal")`` (the run drains
    and ``body`` returns), a second one cancels ``body`` (RuntimeFailure, exit 1)."""
    result: list[T] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if stopper.reason is None:
                        log.info("%s: finishing up", signal.Signals(signum).name)
                        stopper.stop("signal")
                    else:
                        nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        result.append(await body())
        nursery.cancel_scope.cancel()
    if not result:
        raise RuntimeFailure("stopped by a second signal")
    return result[0]
