"""The Toolbox: the tools offered to the model, and one call run safely end to end."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from r2d2voice.appliance.tools import arguments
from r2d2voice.appliance.tools.builtins import BUILTINS, END_OUTPUT, Volume, time_report
from r2d2voice.appliance.tools.config import CommandSpec, read_tools_file
from r2d2voice.appliance.tools.process import OUTPUT_CAP, run_command

if TYPE_CHECKING:
    from r2d2voice.appliance.tools.memory import Memory

log = logging.getLogger("r2d2voice.appliance.tools")

Status = Literal["ok", "error", "timeout", "rejected"]
# At most this many command tools run at once; a further call waits for a slot (its timeout
# starts when it runs). Built-ins and rejections never wait.
MAX_CONCURRENT = 4


@dataclass(frozen=True)
class ToolResult:
    """What a call produced: ``output`` goes back to the model, all of it to the audit trail."""

    status: Status
    output: str
    exit_code: int | None = None
    duration_ms: int = 0


@dataclass(frozen=True)
class ToolContext:
    """The caller's side of one call: ``call_id`` for the log, and what ``end_conversation``
    does (e.g. set the "hang up after the goodbye" flag)."""

    call_id: str = ""
    on_end_conversation: Callable[[], None] | None = None


@dataclass(frozen=True)
class _Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    check: Any  # a jsonschema validator
    command: CommandSpec | None  # None: a built-in


class Toolbox:
    """Built-ins, the memory tools (with ``memory``) and command tools by name. ``state_path``
    keeps the volume across restarts (a small JSON file, e.g. next to the database); None
    keeps it in memory."""

    def __init__(self, builtins: tuple[str, ...] = (), commands: tuple[CommandSpec, ...] = (),
                 *, state_path: str | os.PathLike[str] | None = None,
                 max_concurrent: int = MAX_CONCURRENT, memory: Memory | None = None) -> None:
        self._tools: dict[str, _Tool] = {}
        offered = {name: BUILTINS[name] for name in builtins}
        offered.update(memory.tools if memory is not None else {})
        for name, (description, schema) in offered.items():
            self._tools[name] = _Tool(name, description, schema, arguments.validator(schema), None)
        self.memory = memory
        for spec in commands:
            self._tools[spec.name] = _Tool(spec.name, spec.description, spec.parameters,
                                           arguments.validator(spec.parameters), spec)
        self.volume = Volume(state_path)
        self._max_concurrent = max_concurrent
        self._limiter: trio.CapacityLimiter | None = None

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def command_of(self, name: str) -> CommandSpec | None:
        """The command behind tool ``name`` (None for a built-in); KeyError if unknown."""
        return self._tools[name].command

    def session_tools(self) -> list[dict[str, Any]]:
        """The ``tools`` of a GA ``session.update`` (the caller adds ``tool_choice``)."""
        return [{"type": "function", "name": t.name, "description": t.description,
                 "parameters": copy.deepcopy(t.parameters)} for t in self._tools.values()]

    async def call(self, name: str, arguments_json: str, *, context: ToolContext) -> ToolResult:
        """Validate, then run tool ``name``. Never raises for the tool's faults: a bad call is
        ``rejected`` (nothing ran), a failing one ``error``, a slow one ``timeout``. Only this
        call's own timeout ends it; cancelling the caller still ends its process group."""
        start = trio.current_time()
        result = await self._call(name, arguments_json, context)
        result = ToolResult(result.status, result.output, result.exit_code,
                            round((trio.current_time() - start) * 1000))
        level = logging.INFO if result.status == "ok" else logging.WARNING
        log.log(level, "tool %s (call %s): %s in %d ms", name, context.call_id or "-",
                result.status, result.duration_ms)
        return result

    async def _call(self, name: str, arguments_json: str, context: ToolContext) -> ToolResult:
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            what = "is not enabled" if name in BUILTINS else "does not exist"
            return ToolResult("rejected", f"tool {name!r} {what} (available: {known})")
        try:
            args = arguments.parse(arguments_json)
        except ValueError as exc:
            return ToolResult("rejected", f"invalid arguments: {exc}")
        problem = arguments.problem(tool.check, args)
        if problem is not None:
            return ToolResult("rejected", f"invalid arguments: {problem}")
        if tool.command is None:
            return await self._builtin(name, args, context)
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._max_concurrent)
        async with self._limiter:
            return await _run(tool.command, args)

    async def _builtin(self, name: str, args: dict[str, Any], context: ToolContext) -> ToolResult:
        if self.memory is not None and name in self.memory.tools:
            return await self.memory.call(name, args)
        if name == "get_time":
            return ToolResult("ok", time_report())
        if name == "set_volume":
            await self.volume.set(args["percent"])
            return ToolResult("ok", f"volume set to {args['percent']} %")
        if context.on_end_conversation is not None:
            context.on_end_conversation()
        return ToolResult("ok", END_OUTPUT)


async def _run(spec: CommandSpec, args: dict[str, Any]) -> ToolResult:
    payload = json.dumps(args, ensure_ascii=False).encode() + b"\n"
    try:
        done = await run_command(spec.command, payload, timeout_s=spec.timeout_s,
                                 cap=OUTPUT_CAP)
    except OSError as exc:
        return ToolResult("error", f"tool could not start: {exc.strerror or exc}")
    if done.stderr.strip():
        log.log(logging.INFO if done.exit_code == 0 else logging.WARNING,
                "tool %s stderr: %s", spec.name, done.stderr.rstrip())
    output = done.stdout.rstrip()
    if done.timed_out:
        note = f"timed out after {spec.timeout_s:g} s and was stopped"
        return ToolResult("timeout", f"{note}; output so far: {output}" if output else note)
    code = done.exit_code
    if code == 0:
        return ToolResult("ok", output, code)
    assert code is not None
    why = f"killed by {_signal_name(-code)}" if code < 0 else f"failed with exit code {code}"
    return ToolResult("error", f"{why}: {output}" if output else why, code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def load_tools(path: str | os.PathLike[str], *,
               state_path: str | os.PathLike[str] | None = None) -> Toolbox:
    """The Toolbox a tools file describes; ConfigError (exit 3) naming file, tool and problem."""
    spec = read_tools_file(path)
    return Toolbox(spec.builtins, spec.tools, state_path=state_path)
