"""Standard output as a command sees it: a closed pipe is a normal end, a failed write a
one-line error.

:func:`guard_stdout` puts :class:`GuardedStdout` in ``sys.stdout`` for the command: a write or
flush that fails for any reason but a closed pipe (``/dev/full``, an I/O error) raises
:class:`OutputFailed` (exit 1) naming the reason; a closed pipe (``| head -1``) still raises
``BrokenPipeError``, which :func:`quiet_stdout` turns into silence (exit 0).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from r2d2voice.errors import RuntimeFailure

__all__ = ["GuardedStdout", "OutputFailed", "guard_stdout", "quiet_stdout"]


class OutputFailed(RuntimeFailure):
    """Standard output could not be written (not a closed pipe: that is a normal end)."""


class GuardedStdout:
    """``stream`` with its failed writes and flushes as :class:`OutputFailed`."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _failed(exc) from None

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _failed(exc) from None

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, …
        return getattr(self.stream, name)


def _failed(exc: OSError) -> OutputFailed:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputFailed(f"cannot write standard output: {reason[:1].lower()}{reason[1:]}")


def guard_stdout() -> None:
    """Put a :class:`GuardedStdout` in ``sys.stdout`` (once)."""
    if not isinstance(sys.stdout, GuardedStdout) and sys.stdout is not None:
        sys.stdout = GuardedStdout(sys.stdout)  # type: ignore[assignment]


def flush_stdout() -> None:
    """Flush what a command printed, so a failure is the command's (not the interpreter's at
    exit, which would print a traceback-like line and exit 120)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def quiet_stdout(*, stderr: bool = False) -> None:
    """Point standard output (and ``stderr`` too) at /dev/null: nothing more can be written
    there (its reader is gone, or its disk is full), and neither the buffered rest nor the
    finalizers of half-read queries may complain at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream, default in ((sys.stdout, 1), *(((sys.stderr, 2),) if stderr else ())):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = default
        os.dup2(devnull, fd)
    os.close(devnull)
