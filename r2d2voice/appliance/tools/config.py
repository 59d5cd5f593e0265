"""The tools file (TOML): read it, validate every entry, and report a problem in one line."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from r2d2voice.appliance.tools.mcp.config import McpSpec, parse_mcp
from r2d2voice.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 600.0
BUILTIN_NAMES = ("get_time", "set_volume", "end_conversation")
# The Realtime API's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_KEYS = {"name", "description", "command", "timeout_s", "parameters"}
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class CommandSpec:
    """One ``[[tool]]``: an argv run without a shell, its JSON Schema and its timeout."""

    name: str
    description: str
    parameters: dict[str, Any]
    command: tuple[str, ...]
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class ToolsFile:
    """What a tools file asks for: opt-in built-ins (in file order) and command tools."""

    path: Path
    builtins: tuple[str, ...]
    tools: tuple[CommandSpec, ...]
    mcp: tuple[McpSpec, ...] = ()


def one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, shortened to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def read_tools_file(path: str | os.PathLike[str],
                    variables: Mapping[str, str] | None = None) -> ToolsFile:
    """Parse and validate ``path``; any problem is a :class:`ConfigError` naming file and tool.
    ``variables`` fill ``${VAR}`` in ``[[mcp]]`` headers and env (default: the environment)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"tools file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tools file {path} cannot be read: {one_line(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {one_line(exc)}") from None
    unknown = sorted(set(raw) - {"builtins", "tool", "mcp", "hook"})  # [[hook]]: tools/hooks.py
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} "
                          "(expected 'builtins', [[tool]], [[mcp]] or [[hook]])")
    builtins = _builtins(path, raw.get("builtins", []))
    entries = raw.get("tool", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'tool' must be an array of tables ([[tool]])")
    seen: dict[str, str] = {name: "a built-in" for name in builtins}
    tools = []
    for index, entry in enumerate(entries, 1):
        spec = _tool(path, index, entry)
        if spec.name in seen:
            raise ConfigError(
                f"{path}: tool {spec.name!r}: duplicate name (already {seen[spec.name]})")
        seen[spec.name] = f"tool #{index}"
        tools.append(spec)
    servers = parse_mcp(path, raw.get("mcp", []),
                        os.environ if variables is None else variables,
                        lambda argv, fail: _command(path, argv, fail), _timeout)
    return ToolsFile(path, builtins, tuple(tools), servers)


def _builtins(path: Path, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: builtins must be a list of names, e.g. [\"get_time\"]")
    for name in value:
        if name not in BUILTIN_NAMES:
            raise ConfigError(f"{path}: builtins: unknown built-in {name!r} "
                              f"(known: {', '.join(BUILTIN_NAMES)})")
    if len(set(value)) != len(value):
        dup = next(n for n in value if value.count(n) > 1)
        raise ConfigError(f"{path}: tool {dup!r}: duplicate name (listed twice in builtins)")
    return tuple(value)


def _tool(path: Path, index: int, entry: object) -> CommandSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: tool #{index}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problem = ("name is missing" if name is None
                   else f"name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        raise ConfigError(f"{path}: tool #{index}: {problem}")

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: tool {name!r}: {problem}")

    extra = sorted(set(entry) - _TOOL_KEYS)
    if extra:
        raise fail(f"unknown key {extra[0]!r} (expected {', '.join(sorted(_TOOL_KEYS))})")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise fail("description must be a string")
    return CommandSpec(name=name, description=description,
                       parameters=_parameters(entry.get("parameters", _EMPTY_SCHEMA), fail),
                       command=_command(path, entry.get("command"), fail),
                       timeout_s=_timeout(entry.get("timeout_s", DEFAULT_TIMEOUT_S), fail))


def _parameters(schema: object, fail: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise fail("parameters must be a table (a JSON Schema)")
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        raise fail("parameters hold a TOML date or time, which JSON cannot express") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise fail(f"parameters is not a valid JSON Schema: {one_line(exc.message, 160)} "
                   f"(at {exc.json_path})") from None
    if schema.get("type") != "object":
        raise fail('parameters must have type = "object" (the arguments are a JSON object)')
    return schema


def _command(path: Path, argv: object, fail: Any) -> tuple[str, ...]:
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and a for a in argv)):
        raise fail('command must be a non-empty list of strings, e.g. ["/usr/local/bin/r2-head"]')
    program = argv[0]
    if "/" in program:
        resolved = Path(program).expanduser()
        if not resolved.is_absolute():
            resolved = path.parent / resolved
    else:
        found = shutil.which(program)
        if found is None:
            raise fail(f"command {program!r} is not on PATH")
        resolved = Path(found)
    if not resolved.exists():
        raise fail(f"command {resolved} does not exist")
    if not resolved.is_file():
        raise fail(f"command {resolved} is not a file")
    if not os.access(resolved, os.X_OK):
        raise fail(f"command {resolved} is not executable")
    return (str(resolved.absolute()), *argv[1:])


def _timeout(value: object, fail: Any) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S)
    if not ok:
        raise fail(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                   f"got {value!r}")
    return float(value)
