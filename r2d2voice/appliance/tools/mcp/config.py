"""``[[mcp]]`` entries of the tools file: a local server (``command``, stdio) or a streamable
HTTP one (``url``), which of its tools are offered, which need the person's yes, and how
``${VAR}`` in ``headers`` and ``[mcp.env]`` is filled in (from the environment, then the env
file). Every problem is one line naming the file and the server; a value filled in from a
variable is never part of a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from r2d2voice.errors import ConfigError
from r2d2voice.realtime.remote_mcp import SEPARATOR  # between server and tool in a name

#: a server's name: lower case words joined by single underscores (``home``, ``living_room``),
#: so ``<name>__<tool>`` splits back unambiguously at the first double underscore
_SERVER_NAME = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = ("name", "command", "url", "headers", "tools", "confirm", "timeout_s", "env", "remote")

Fail = Callable[[str], ConfigError]


@dataclass(frozen=True)
class McpSpec:
    """One ``[[mcp]]`` server. ``headers`` and ``env`` hold the values with ``${VAR}`` filled
    in (secrets: kept out of ``repr``)."""

    name: str
    command: tuple[str, ...] | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: the allowlist (None: every tool the server offers)
    tools: tuple[str, ...] | None = None
    confirm: tuple[str, ...] = ()
    timeout_s: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: handed to the Realtime service's own MCP tool instead of connected from here
    remote: bool = False

    @property
    def where(self) -> str:
        """The server's address for messages: its argv or URL (never a header)."""
        return " ".join(self.command) if self.command else str(self.url)

    def offers(self, tool: str) -> bool:
        return self.tools is None or tool in self.tools


def parse_mcp(path: Path, entries: object, variables: Mapping[str, str],
              resolve_command: Callable[[object, Fail], tuple[str, ...]],
              timeout: Callable[[object, Fail], float]) -> tuple[McpSpec, ...]:
    """The ``[[mcp]]`` array of ``path``; ``variables`` fill ``${VAR}``; ``resolve_command``
    and ``timeout`` are the tools file's own checks of a command and a timeout."""
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'mcp' must be an array of tables ([[mcp]])")
    specs: list[McpSpec] = []
    for index, entry in enumerate(entries, 1):
        spec = _server(path, index, entry, variables, resolve_command, timeout)
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"{path}: mcp {spec.name!r}: duplicate name")
        specs.append(spec)
    return tuple(specs)


def _server(path: Path, index: int, entry: object, variables: Mapping[str, str],
            resolve_command: Callable[[object, Fail], tuple[str, ...]],
            timeout: Callable[[object, Fail], float]) -> McpSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: mcp #{index}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not _SERVER_NAME.match(name) or len(name) > 32:
        problem = ("name is missing" if name is None else
                   f"name {name!r} must be lower-case letters and digits in words joined by "
                   "single underscores (e.g. 'home'), at most 32 characters")
        raise ConfigError(f"{path}: mcp #{index}: {problem}")

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: mcp {name!r}: {problem}")

    extra = sorted(set(entry) - set(_KEYS))
    if extra:
        raise fail(f"unknown key {extra[0]!r} (expected {', '.join(_KEYS)})")
    has_command, has_url = "command" in entry, "url" in entry
    if has_command == has_url:
        raise fail("give exactly one of command (a local server) and url (streamable HTTP)")
    remote = entry.get("remote", False)
    if not isinstance(remote, bool):
        raise fail("remote must be true or false")
    url = _url(entry["url"], fail) if has_url else None
    if remote and not has_url:
        raise fail("remote = true needs a url the Realtime service can reach")
    if remote and "env" in entry:
        raise fail("env is for a local server (command); a remote one has none")
    if has_url and "env" in entry:
        raise fail("env is for a local server (command); use headers for a url")
    if has_command and "headers" in entry:
        raise fail("headers are for a url; give a local server its environment in [mcp.env]")
    tools = _names(entry["tools"], "tools", fail) if "tools" in entry else None
    confirm = _names(entry.get("confirm", []), "confirm", fail)
    for tool in confirm:
        if tools is not None and tool not in tools:
            raise fail(f"confirm names {tool!r}, which tools does not offer")
    return McpSpec(
        name=name,
        command=resolve_command(entry["command"], fail) if has_command else None,
        url=url,
        headers=_strings(entry.get("headers", {}), "headers", variables, fail),
        tools=tools, confirm=confirm,
        timeout_s=timeout(entry.get("timeout_s", 10.0), fail),
        env=_strings(entry.get("env", {}), "env", variables, fail),
        remote=remote)


def _url(value: object, fail: Fail) -> str:
    if not isinstance(value, str):
        raise fail("url must be a string, e.g. \"http://homeassistant.local:8123/api/mcp\"")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(f"url must be an http:// or https:// address, got {value!r}")
    if parts.username or parts.password:
        raise fail("url must not hold a user or password: put a token in headers")
    return value


def _names(value: object, key: str, fail: Fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(f"{key} must be a list of the server's tool names, e.g. [\"set_light\"]")
    if len(set(value)) != len(value):
        raise fail(f"{key} lists {next(v for v in value if value.count(v) > 1)!r} twice")
    return tuple(value)


def _strings(value: object, key: str, variables: Mapping[str, str],
             fail: Fail) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise fail(f"{key} must be a table of strings")
    return {k: expand(v, variables, lambda p, k=k: fail(f"{key}.{k}: {p}"))
            for k, v in value.items()}


def expand(template: str, variables: Mapping[str, str], fail: Fail) -> str:
    """``template`` with each ``${VAR}`` replaced by its value; ``$${`` is a literal ``${``.
    An unset or empty variable is an error naming it (never its value)."""

    def one(match: re.Match[str]) -> str:
        var = match.group(1)
        if not _VAR_NAME.match(var):
            raise fail(f"${{{var}}} is not a variable name")
        value = variables.get(var)
        if not value:
            raise fail(f"${{{var}}} is not set (in the environment or the env file)")
        return value

    parts = template.split("$${")
    return "${".join(_VAR.sub(one, part) for part in parts)


def variables(env_file: Path | None) -> dict[str, str]:
    """What ``${VAR}`` may name: the env file's keys, overridden by the process environment
    (the same order as the settings)."""
    values: dict[str, str] = {}
    if env_file is not None:
        from dotenv import dotenv_values

        try:
            values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        except (OSError, UnicodeDecodeError):
            values = {}  # the settings already reported an unreadable env file
    return {**values, **os.environ}


def split_name(offered: str) -> tuple[str, str] | None:
    """``home__set_light`` → (``home``, ``set_light``); None for a name without the separator."""
    server, sep, tool = offered.partition(SEPARATOR)
    return (server, tool) if sep and server and tool else None


def describe_problem(spec: McpSpec, problem: Any) -> str:
    """One line about ``spec`` for the log: its name and address, never its headers."""
    return f"mcp server {spec.name!r} ({spec.where}): {problem}"
