"""Function tools, as the service checks them in ``session.update`` (``type: "mcp"`` tools in
:mod:`.mcp`), and the reply that quotes a tool's output (pure functions)."""

from __future__ import annotations

import copy
import re
from typing import Any

from r2d2voice.localbackend.mcp import check_mcp_tool
from r2d2voice.localbackend.wire import Json, require

__all__ = ["check_tool_choice", "check_tools", "offers_tools", "quote_outputs"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_KEYS = {"type", "name", "description", "parameters"}
QUOTE_CHARS = 200
"""A quoted tool output longer than this is cut (the transcript stays a sentence)."""


def check_tools(value: Any, where: str = "session.tools") -> list[Json]:
    """A copy of the tools at ``where``, or a ClientError naming what the service would
    refuse."""
    require(isinstance(value, list), f"Invalid type for '{where}': expected an array.", where)
    names: set[str] = set()
    checked: list[Json] = []
    for i, tool in enumerate(value):
        p = f"{where}[{i}]"
        require(isinstance(tool, dict), f"Invalid type for '{p}': expected an object.", p)
        if tool.get("type") == "mcp":
            checked.append(check_mcp_tool(tool, p))
            continue
        require(tool.get("type", "function") == "function",
                f"Invalid value for '{p}.type': the local backend supports 'function' and "
                "'mcp'.", f"{p}.type")
        for key in tool:
            require(key in _TOOL_KEYS, f"Unknown parameter: '{p}.{key}'.", f"{p}.{key}",
                    "unknown_parameter")
        name = tool.get("name")
        require(isinstance(name, str), f"Missing required parameter: '{p}.name'.", f"{p}.name",
                "missing_required_parameter")
        require(bool(_NAME.match(name)),
                f"Invalid '{p}.name': string does not match pattern. Expected a string that "
                "matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.", f"{p}.name")
        require(name not in names, f"Duplicate tool name: '{name}'.", f"{p}.name")
        names.add(name)
        if "description" in tool:
            require(isinstance(tool["description"], str),
                    f"Invalid type for '{p}.description': expected a string.", f"{p}.description")
        if "parameters" in tool:
            params = tool["parameters"]
            require(isinstance(params, dict) and params.get("type", "object") == "object",
                    f"Invalid schema for function '{name}': schema must be a JSON Schema of "
                    "'type: \"object\"'.", f"{p}.parameters")
        checked.append({"type": "function", **copy.deepcopy(tool)})
    return checked


def check_tool_choice(value: Any, tools: list[Json]) -> Json | str:
    """``session.tool_choice`` if valid for ``tools``, else a ClientError."""
    where = "session.tool_choice"
    if isinstance(value, str):
        require(value in ("auto", "none", "required"),
                f"Invalid value for '{where}': expected 'auto', 'none', 'required' or an "
                "object.", where)
        return value
    require(isinstance(value, dict) and value.get("type") == "function"
            and isinstance(value.get("name"), str),
            f"Invalid '{where}': expected {{'type': 'function', 'name': ...}}.", where)
    require(any(t.get("name") == value["name"] for t in tools),
            f"Tool choice 'function' with name '{value['name']}' not found in 'tools'.", where)
    return {"type": "function", "name": value["name"]}


def offers_tools(session: Json) -> bool:
    """Whether the model may call a function now (tools offered, ``tool_choice`` not none)."""
    return bool(session.get("tools")) and session.get("tool_choice") != "none"


def quote_outputs(outputs: list[tuple[str, str]]) -> str:
    """The transcript of a reply to tool outputs: ``*beep* (tool NAME said: OUTPUT)``."""
    quotes = []
    for name, output in outputs:
        said = " ".join(output.split())
        if len(said) > QUOTE_CHARS:
            said = said[:QUOTE_CHARS] + "…"
        quotes.append(f"(tool {name} said: {said})")
    return "*beep* " + " ".join(quotes)
