"""The Toolbox: the tools offered to the model, and one call run safely end to end."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from r2d2voice.appliance.tools import arguments
from r2d2voice.appliance.tools.builtins import BUILTINS, END_OUTPUT, Volume, time_report
from r2d2voice.appliance.tools.config import CommandSpec, read_tools_file
from r2d2voice.appliance.tools.confirm import Confirmations, ask_text
from r2d2voice.appliance.tools.mcp.config import McpSpec
from r2d2voice.appliance.tools.process import OUTPUT_CAP, run_command
from r2d2voice.errors import ConfigError

if TYPE_CHECKING:
    from r2d2voice.appliance.tools.mcp.tools import McpTools

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
    #: the call's place in the conversation: only a later utterance can confirm it
    seq: int | None = None
    #: tells the model something while the call runs (to ask the person for a yes); None:
    #: this caller cannot, so a call that needs a yes is rejected
    ask: Callable[[str], Awaitable[None]] | None = None


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
                 max_concurrent: int = MAX_CONCURRENT, memory: Memory | None = None,
                 mcp: tuple[McpSpec, ...] = (),
                 confirmations: Confirmations | None = None) -> None:
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
        self.confirmations = confirmations or Confirmations()
        self.mcp: McpTools | None = _mcp_tools(mcp) if mcp else None

    def __len__(self) -> int:
        return len(self._tools)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Toolbox]:
        """The MCP servers connected (and restarted) for as long as this is entered; their
        tools are offered as each becomes ready. Without MCP servers: nothing to run."""
        if self.mcp is None:
            yield self
            return
        async with self.mcp.run():
            yield self

    @property
    def version(self) -> int:
        """Changes whenever :meth:`session_tools` would (MCP servers come, go, change)."""
        return self.mcp.version if self.mcp is not None else 0

    async def changed(self, since: int) -> None:
        """Until :attr:`version` differs from ``since`` (forever without MCP servers)."""
        if self.mcp is None:
            await trio.sleep_forever()
        else:
            await self.mcp.changed(since)

    def heard(self, text: str, seq: int | None = None) -> None:
        """The person said ``text`` (a final user transcript at conversation place ``seq``):
        it answers the calls waiting for a yes."""
        self.confirmations.heard(text, seq)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def command_of(self, name: str) -> CommandSpec | None:
        """The command behind tool ``name`` (None for a built-in); KeyError if unknown."""
        return self._tools[name].command

    def session_tools(self) -> list[dict[str, Any]]:
        """The ``tools`` of a GA ``session.update`` (the caller adds ``tool_choice``)."""
        tools = [{"type": "function", "name": t.name, "description": t.description,
                  "parameters": copy.deepcopy(t.parameters)} for t in self._tools.values()]
        if self.mcp is not None:
            taken = set(self._tools)
            tools += [copy.deepcopy(t) for t in self.mcp.session_tools()
                      if t.get("name") not in taken]
        return tools

    async def call(self, name: str, arguments_json: str, *, context: ToolContext) -> ToolResult:
        """Validate, then run tool ``name``. Never raises for the tool's faults: a bad call is
        ``rejected`` (nothing ran), a failing one ``error``, a slow one ``timeout``. Only this
        call's own timeout ends it; cancelling the caller still ends its process group."""
        start = trio.current_time()
        result = await self._call(name, arguments_json, context)
        # an MCP call measures its own run (not the wait for the person's yes)
        duration = result.duration_ms or round((trio.current_time() - start) * 1000)
        result = ToolResult(result.status, result.output, result.exit_code, duration)
        level = logging.INFO if result.status == "ok" else logging.WARNING
        log.log(level, "tool %s (call %s): %s in %d ms", name, context.call_id or "-",
                result.status, result.duration_ms)
        return result

    async def _call(self, name: str, arguments_json: str, context: ToolContext) -> ToolResult:
        tool = self._tools.get(name)
        if tool is None and self.mcp is not None:
            found = self.mcp.lookup(name)
            if found is not None:
                return await self._mcp(found, arguments_json, context)
            if self.mcp.remote.needs_confirm(name) is not None:  # the service's approval
                return await self._confirmed(name, arguments_json, context,
                                             self.mcp.remote.needs_confirm(name) is True)
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

    async def _mcp(self, found: Any, arguments_json: str, context: ToolContext) -> ToolResult:
        server, tool = found
        if tool is None and server.state == "ready":
            offers = ", ".join(t.name for t in server.tools.values()) or "none"
            return ToolResult("rejected", f"the {server.spec.name} server has no such tool "
                                          f"(it offers: {offers})")
        if tool is None:
            return ToolResult("error", server.unavailable())
        try:
            args = arguments.parse(arguments_json)
        except ValueError as exc:
            return ToolResult("rejected", f"invalid arguments: {exc}")
        problem = arguments.problem(tool.check, args)
        if problem is not None:  # nothing reaches the server
            return ToolResult("rejected", f"invalid arguments: {problem}")
        assert self.mcp is not None
        if self.mcp.confirm(tool.name):
            verdict = await self._confirmed(tool.name, json.dumps(args, ensure_ascii=False),
                                            context, True)
            if verdict.status != "ok":
                return verdict
        start = trio.current_time()
        done = await self.mcp.call(server, tool, args)
        return ToolResult(done.status, done.output,
                          duration_ms=round((trio.current_time() - start) * 1000))

    async def _confirmed(self, name: str, arguments_json: str, context: ToolContext,
                         needed: bool) -> ToolResult:
        """``ok`` once the person's next utterance said yes (at once when no yes is
        ``needed``); ``rejected`` after a no, a change of subject or silence."""
        if not needed:
            return ToolResult("ok", "approved: it needs no confirmation")
        if context.ask is None:
            return ToolResult("rejected", "not run: it needs the person's spoken yes, which "
                                          "cannot be asked for here")
        hold = self.confirmations.hold(context.seq)
        log.info("tool %s (call %s) waits for the person's yes", name, context.call_id or "-")
        await context.ask(ask_text(name, arguments_json))
        answer = await self.confirmations.wait(hold)
        if answer.verdict != "yes":
            return ToolResult("rejected", answer.refusal(self.confirmations.window_s))
        return ToolResult("ok", f"confirmed: the person said {answer.text!r}")

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


def _mcp_tools(specs: tuple[McpSpec, ...]) -> McpTools:
    try:
        from r2d2voice.appliance.tools.mcp.tools import McpTools
    except ImportError as exc:
        raise ConfigError(f"[[mcp]] servers need the MCP SDK ({exc.name} is missing): "
                          "pip install 'r2d2voice[mcp]'") from None
    return McpTools(specs)


def load_tools(path: str | os.PathLike[str], *,
               state_path: str | os.PathLike[str] | None = None,
               variables: Mapping[str, str] | None = None) -> Toolbox:
    """The Toolbox a tools file describes; ConfigError (exit 3) naming file, tool and problem.
    ``variables`` fill ``${VAR}`` in ``[[mcp]]`` entries (default: the environment)."""
    spec = read_tools_file(path, variables)
    return Toolbox(spec.builtins, spec.tools, state_path=state_path, mcp=spec.mcp)
