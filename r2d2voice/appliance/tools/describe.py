"""``r2d2voice tools``: list the tools of a tools file with their arguments, or just check it."""

from __future__ import annotations

import json
import os
from typing import Any, TextIO

from r2d2voice.appliance.tools.config import CommandSpec
from r2d2voice.appliance.tools.hooks import read_hooks
from r2d2voice.appliance.tools.runner import load_tools

_SHOWN = {"type", "description"}


def tools_command(path: str | os.PathLike[str], check: bool, out: TextIO) -> None:
    """Validate ``path`` (ConfigError on a problem); print "ok: N tools" or the listing."""
    box = load_tools(path)
    hooks = read_hooks(path)  # [[hook]] entries are checked too (tools/hooks.py)
    counted = f", {len(hooks)} hook{'s' if len(hooks) != 1 else ''}" if hooks else ""
    if check:
        out.write(f"ok: {len(box)} tools{counted}\n")
        return
    out.write(f"{len(box)} tools{counted} in {path}\n")
    for entry in box.session_tools():
        out.write("\n" + "\n".join(describe(entry, box.command_of(entry["name"]))) + "\n")
    for hook in hooks:
        out.write(f"\nhook #{hook.index}  {' '.join(hook.command)}  (timeout "
                  f"{hook.timeout_s:g} s)\n  on: {', '.join(hook.on)}\n")


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
