"""Standard output as a command sees it: a closed pipe is a normal end, a failed write a
one-line error.

:func:`guard_stdout` puts :class:`GuardedStdout` in ``sys.stdout`` for the command: a write or
flush that fails for any reason but a closed pipe (``/dev/full``, an I/O error) raises
:class:`OutputFailed` (exit 1) naming the reason. A closed pipe (``| head -1``) raises
``BrokenPipeError``, which the CLI turns into silence and exit 0: a report stops there. A
command that holds a conversation calls :func:`keep_going_when_closed` first: its output then
goes to /dev/null and the conversation goes on to its end, every turn stored.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from r2d2voice.errors import RuntimeFailure

__all__ = ["GuardedStdout", "OutputFailed", "guard_stdout", "keep_going_when_closed",
           "quiet_stdout"]


class OutputFailed(RuntimeFailure):
    """Standard output could not be written (not a closed pipe: that is a normal end)."""


class GuardedStdout:
    """``stream`` with its failed writes and flushes as :class:`OutputFailed`; with
    ``keep_going`` a closed pipe is written to /dev/null instead."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.keep_going = False

    def write(self, text: str) -> int:
        return self._guarded(self.stream.write, text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            if not self.keep_going:
                raise
            quiet_stdout()  # the reader went away: the rest goes nowhere
            return call(*args)
        except OSError as exc:
            raise _failed(exc) from None

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, …
        return getattr(self.stream, name)


def _failed(exc: OSError) -> OutputFailed:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputFailed(f"cannot write standard output: {reason[:1].lower()}{reason[1:]}")


def keep_going_when_closed() -> None:
    """A closed pipe on standard output no longer ends the command (a conversation goes on)."""
    if isinstance(sys.stdout, GuardedStdout):
        sys.stdout.keep_going = True


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
