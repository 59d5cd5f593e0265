"""``r2d2voice serve-local``: the local backend on a port until SIGINT/SIGTERM.

For the CLI: :func:`backend_config` turns ``--fault NAME[=VALUE]`` (repeatable) and
``--script FILE`` into a :class:`BackendConfig` (or a one-line :class:`BackendOptionError`),
:func:`serve_local_command` serves it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from pathlib import Path

import trio

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.fault_options import FaultError, parse_faults
from r2d2voice.localbackend.script import ScriptError, load_script
from r2d2voice.localbackend.server import serve_local

__all__ = ["BackendOptionError", "ListenError", "backend_config", "serve_local_command"]


class ListenError(OSError):
    """The port cannot be bound; ``str()`` is one line: ``cannot listen on HOST:PORT: why``.

    The room may not import :mod:`r2d2voice.errors`: the CLI maps this to a usage error
    (exit code 2).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class BackendOptionError(ValueError):
    """A ``--fault`` or ``--script`` that cannot be used; ``str()`` is one line. The CLI maps
    it to a usage error (exit code 2)."""


def backend_config(faults: Iterable[str] = (), script: str | Path | None = None,
                   **config: object) -> BackendConfig:
    """The :class:`BackendConfig` for ``serve-local --fault ... --script FILE`` (``config``:
    other :class:`BackendConfig` fields)."""
    try:
        return BackendConfig(faults=parse_faults(faults),
                             script=load_script(script) if script is not None else None,
                             **config)  # type: ignore[arg-type]
    except (FaultError, ScriptError) as exc:
        raise BackendOptionError(str(exc)) from None


def serve_local_command(host: str, port: int, config: BackendConfig | None = None) -> None:
    """Serve ``config`` (default: :class:`BackendConfig()`) on ``host``:``port`` (0: any free
    port), print the URL on stdout, and stop on SIGINT/SIGTERM (returning normally). Raises
    :class:`ListenError` if it cannot listen."""
    config = config or BackendConfig()

    async def main() -> OSError | None:
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(serve_local, host, port, config)
            except OSError as exc:
                return exc  # raised outside the nursery: one plain error, not a group
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                # announced only once a signal stops it gracefully
                print(f"local Realtime backend on ws://{host}:{bound}/v1/realtime", flush=True)
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
        return None

    failure = trio.run(main)
    if failure is not None:
        why = failure.strerror or str(failure)
        raise ListenError(failure.errno, f"cannot listen on {host}:{port}: {why}")
