"""``r2d2voice serve-local``: the local backend on a port until SIGINT/SIGTERM."""

from __future__ import annotations

import signal

import trio

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.server import serve_local

__all__ = ["ListenError", "serve_local_command"]


class ListenError(OSError):
    """The port cannot be bound; ``str()`` is one line: ``cannot listen on HOST:PORT: why``.

    The room may not import :mod:`r2d2voice.errors`: the CLI maps this to a usage error
    (exit code 2).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def serve_local_command(host: str, port: int) -> None:
    """Serve on ``host``:``port`` (0: any free port), print the URL on stdout, and stop on
    SIGINT/SIGTERM (returning normally). Raises :class:`ListenError` if it cannot listen."""

    async def main() -> OSError | None:
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(serve_local, host, port, BackendConfig())
            except OSError as exc:
                return exc  # raised outside the nursery: one plain error, not a group
            print(f"local Realtime backend on ws://{host}:{bound}/v1/realtime", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
        return None

    failure = trio.run(main)
    if failure is not None:
        why = failure.strerror or str(failure)
        raise ListenError(failure.errno, f"cannot listen on {host}:{port}: {why}")
