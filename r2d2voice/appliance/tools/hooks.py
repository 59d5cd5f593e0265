"""Hooks: programs run on the conversation's events, declared in the tools file.

.. code-block:: toml

    [[hook]]
    on = ["speaking", "spoken"]               # events (system/events.py); "level" only if named
    command = ["/usr/local/bin/r2-dome"]      # argv, never through a shell
    timeout_s = 5                             # default 5, at most 600

Each event a hook names runs its command once, the event's JSON object on stdin, sandboxed as a
command tool is (``process.run_command``: its own process group, working directory ``/``, a
minimal environment without secrets, capped output, the group ended past ``timeout_s``). A hook
runs one event at a time, in order. It never delays the conversation: its queue holds
:data:`HOOK_QUEUE` events, and what comes while that is full is dropped and counted ("slower than
the events"). A failing, crashing or slow hook is logged (the first time at once, then at most
once a minute with counts) and goes on with the next event.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from r2d2voice.appliance.tools.config import _command, _timeout, read_tools_file
from r2d2voice.appliance.tools.process import run_command
from r2d2voice.appliance.tools.runner import _signal_name
from r2d2voice.errors import ConfigError
from r2d2voice.system.events import LEVEL, NAMES, Events

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("r2d2voice.appliance.tools.hooks")

__all__ = ["HOOK_QUEUE", "HookRunner", "HookSpec", "read_hooks", "run_hooks"]

DEFAULT_TIMEOUT_S = 5.0
#: events waiting for one hook; beyond it they are dropped and counted
HOOK_QUEUE = 8
#: a hook's failures and drops are logged at most this often (the first at once)
REPORT_EVERY_S = 60.0
#: after the run stops, a hook has this long for what is queued
DRAIN_S = 2.0
_HOOK_KEYS = {"on", "command", "timeout_s"}


@dataclass(frozen=True)
class HookSpec:
    """One ``[[hook]]``: the events it runs on, its argv and timeout."""

    on: tuple[str, ...]
    command: tuple[str, ...]
    timeout_s: float = DEFAULT_TIMEOUT_S
    index: int = 1

    @property
    def label(self) -> str:
        return f"hook #{self.index} ({os.path.basename(self.command[0])})"


def read_hooks(path: str | os.PathLike[str],
               variables: Mapping[str, str] | None = None) -> tuple[HookSpec, ...]:
    """The ``[[hook]]`` entries of tools file ``path``; any problem is a ConfigError (exit 3)
    naming the file and the hook, as for tools (``variables`` fill its MCP entries'
    ``${VAR}``, as when the tools are loaded)."""
    read_tools_file(path, variables)  # the whole file: readable TOML, known sections, tools
    path = Path(path)
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("hook", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'hook' must be an array of tables ([[hook]])")
    return tuple(_hook(path, index, entry) for index, entry in enumerate(entries, 1))


def _hook(path: Path, index: int, entry: object) -> HookSpec:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: hook #{index}: {problem}")

    if not isinstance(entry, dict):
        raise fail("must be a table")
    extra = sorted(set(entry) - _HOOK_KEYS)
    if extra:
        raise fail(f"unknown key {extra[0]!r} (expected {', '.join(sorted(_HOOK_KEYS))})")
    on = entry.get("on")
    if (not isinstance(on, list) or not on
            or not all(isinstance(name, str) for name in on)):
        raise fail('on must be a non-empty list of event names, e.g. ["speaking", "spoken"]')
    unknown = [name for name in on if name not in NAMES]
    if unknown:
        raise fail(f"unknown event {unknown[0]!r} (known: {', '.join(NAMES)})")
    return HookSpec(tuple(dict.fromkeys(on)), _command(path, entry.get("command"), fail),
                    _timeout(entry.get("timeout_s", DEFAULT_TIMEOUT_S), fail), index)


@dataclass(eq=False)
class HookRunner:
    """One hook following the hub: ``ran``, ``failed`` and ``dropped`` count its events."""

    spec: HookSpec
    ran: int = 0
    failed: int = 0
    dropped: int = 0
    _reported: tuple[int, int] = (0, 0)  # (failed, dropped) when last logged
    _report_at: float = field(default=float("-inf"))
    _why: str = ""

    async def run(self, hub: Events,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow ``hub`` until it closes, then run what is queued within :data:`DRAIN_S`."""
        spec = self.spec
        with hub.following(spec.on, level=LEVEL in spec.on, bound=HOOK_QUEUE) as sub:
            task_status.started()
            drain = trio.CancelScope()

            async def closing() -> None:
                await hub.wait_closed()
                drain.deadline = trio.current_time() + DRAIN_S

            async with trio.open_nursery() as nursery:
                nursery.start_soon(closing)
                with drain:
                    async for moment in sub.receive:
                        await self._once(moment.line)
                        self.dropped = sub.dropped
                        self._report()
                nursery.cancel_scope.cancel()
            # what the drain deadline left in the queue is lost too
            self.dropped = sub.dropped + sub.receive.statistics().current_buffer_used
        self._report(final=True)

    async def _once(self, line: str) -> None:
        spec = self.spec
        self.ran += 1
        try:
            done = await run_command(spec.command, line.encode() + b"\n",
                                     timeout_s=spec.timeout_s)
        except OSError as exc:
            self._failed(f"could not start: {exc.strerror or exc}")
            return
        if done.timed_out:
            self._failed(f"timed out after {spec.timeout_s:g} s and was stopped")
        elif done.exit_code:
            why = (f"killed by {_signal_name(-done.exit_code)}" if done.exit_code < 0
                   else f"exit code {done.exit_code}")
            stderr = " ".join(done.stderr.split())[:200]
            self._failed(f"{why}{f': {stderr}' if stderr else ''}")

    def _failed(self, why: str) -> None:
        self.failed += 1
        self._why = why
        log.debug("%s failed (%s)", self.spec.label, why)

    def _report(self, final: bool = False) -> None:
        """Failures and drops since the last report: the first at once, then at most once
        every REPORT_EVERY_S (and what is left at the end)."""
        failed, dropped = self.failed - self._reported[0], self.dropped - self._reported[1]
        if not (failed or dropped):
            return
        now = trio.current_time()
        if not final and now - self._report_at < REPORT_EVERY_S:
            return
        self._report_at, self._reported = now, (self.failed, self.dropped)
        parts = [f"{failed} failed (last: {self._why})" if failed else "",
                 f"{dropped} events dropped (slower than the events)" if dropped else ""]
        log.warning("%s: %s; %d run so far", self.spec.label,
                    ", ".join(p for p in parts if p), self.ran)


async def run_hooks(hooks: tuple[HookSpec, ...], hub: Events,
                    task_status: trio.TaskStatus[list[HookRunner]] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Every hook following ``hub`` until it closes; ``task_status.started(runners)`` once all
    are subscribed (no event is missed after that)."""
    runners = [HookRunner(spec) for spec in hooks]
    async with trio.open_nursery() as nursery:
        for runner in runners:
            await nursery.start(runner.run, hub)
        task_status.started(runners)
