"""``r2d2voice tools``: list the tools of a tools file with their arguments, or just check it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, TextIO

import trio

from r2d2voice.appliance.tools.config import CommandSpec
from r2d2voice.appliance.tools.hooks import read_hooks
from r2d2voice.appliance.tools.mcp.config import McpSpec
from r2d2voice.appliance.tools.runner import Toolbox, load_tools

#: how long ``r2d2voice tools`` waits for a local MCP server to list its tools
LIST_TIMEOUT_S = 10.0

_SHOWN = {"type", "description"}


def tools_command(path: str | os.PathLike[str], check: bool, out: TextIO,
                  variables: Mapping[str, str] | None = None) -> None:
    """Validate ``path`` (ConfigError on a problem); print "ok: N tools" or the listing. The
    listing connects to each local MCP server briefly (at most ``LIST_TIMEOUT_S``); ``check``
    connects to nothing."""
    box = load_tools(path, variables=variables)
    servers = box.mcp.specs if box.mcp is not None else ()
    hooks = read_hooks(path, variables)  # [[hook]] entries are checked too (tools/hooks.py)
    counted = f", {len(hooks)} hook{'s' if len(hooks) != 1 else ''}" if hooks else ""
    if check:
        more = f", {len(servers)} MCP servers (not connected)" if servers else ""
        out.write(f"ok: {len(box)} tools{more}{counted}\n")
        return
    if box.mcp is not None:
        trio.run(_connect_briefly, box)
    mcp_names = {t.get("name") for t in box.mcp.session_tools()} if box.mcp else set()
    local = [e for e in box.session_tools() if e.get("type") == "function"
             and e["name"] not in mcp_names]
    out.write(f"{len(local)} tools{counted} in {path}\n")
    for entry in local:
        out.write("\n" + "\n".join(describe(entry, box.command_of(entry["name"]))) + "\n")
    for spec in servers:
        out.write("\n" + "\n".join(_server(box, spec)) + "\n")
    for hook in hooks:
        out.write(f"\nhook #{hook.index}  {' '.join(hook.command)}  (timeout "
                  f"{hook.timeout_s:g} s)\n  on: {', '.join(hook.on)}\n")


async def _connect_briefly(box: Toolbox) -> None:
    assert box.mcp is not None
    quiet = logging.getLogger("r2d2voice.appliance.tools.mcp")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # an unreachable server is one line of the listing
    try:
        async with box.running():
            await box.mcp.wait_ready(LIST_TIMEOUT_S)
            box.mcp.frozen = {name: (server.state, server.problem, dict(server.tools))
                              for name, server in box.mcp.servers.items()}
    finally:
        quiet.setLevel(level)


def _server(box: Toolbox, spec: McpSpec) -> list[str]:
    """The lines of one ``[[mcp]]`` server: its tools, or why there are none."""
    assert box.mcp is not None
    confirm = f"; confirm: {', '.join(spec.confirm)}" if spec.confirm else ""
    if spec.remote:
        allowed = ", ".join(spec.tools) if spec.tools is not None else "all it offers"
        return [f"mcp {spec.name}: {spec.url} — remote: the Realtime service connects to it "
                f"(tools: {allowed}{confirm})"]
    state, problem, tools = box.mcp.frozen.get(spec.name, ("down", "not connected", {}))
    if state != "ready":
        why = problem or f"did not start within {LIST_TIMEOUT_S:g} s"
        return [f"mcp {spec.name}: {spec.where} — not reachable: {why}"]
    lines = [f"mcp {spec.name}: {spec.where} — {len(tools)} tools (timeout "
             f"{spec.timeout_s:g} s{confirm})"]
    for tool in tools.values():
        entry = {"name": tool.name, "description": tool.description, "parameters": tool.schema}
        asks = ", asks for a yes" if tool.tool in spec.confirm else ""
        lines += ["", f"{tool.name}  (mcp {spec.name}{asks})", *describe(entry, None)[1:]]
    return lines


def describe(entry: dict[str, Any], command: CommandSpec | None) -> list[str]:
    """Readable lines for one ``session.update`` tool entry."""
    if command is None:
        head = f"{entry['name']}  (built-in)"
    else:
        head = f"{entry['name']}  {' '.join(command.command)}  (timeout {command.timeout_s:g} s)"
    lines = [head]
    if entry["description"]:
        lines.append(f"  {entry['description']}")
    schema = entry["parameters"]
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    lines.append("  arguments:" if props else "  arguments: none")
    for name, prop in props.items():
        lines.append(f"    {name}: {_property(prop, name in required)}")
    rest = {k: v for k, v in schema.items() if k not in ("type", "properties", "required")}
    if rest:
        lines.append(f"  schema: {json.dumps(rest, ensure_ascii=False)}")
    return lines


def _property(prop: Any, required: bool) -> str:
    if not isinstance(prop, dict):
        return json.dumps(prop)
    kind = prop.get("type", "any")
    parts = [" or ".join(kind) if isinstance(kind, list) else str(kind)]
    parts.append("required" if required else "optional")
    parts += [f"{k} {json.dumps(v, ensure_ascii=False)}" for k, v in prop.items()
              if k not in _SHOWN]
    text = ", ".join(parts)
    return f"{text} — {prop['description']}" if prop.get("description") else text
