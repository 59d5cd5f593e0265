"""``serve-local --script FILE``: what the local backend says or calls, turn by turn (data).

A JSON file (a list of turns, or ``{"turns": [...]}``) or a TOML file (``[[turn]]`` tables).
A turn is a table with any of:

- ``say``: the reply's transcript (the audio is still beeps);
- ``hear``: what the user "said" in this turn — the transcript of the turn-th user utterance
  (default ``(speech, N s)``: the backend understands no words);
- ``call``: the name of a function tool to call, with ``arguments`` — a table (sent as
  indented JSON, whitespace and newlines included) or a string sent verbatim (e.g. invalid
  JSON); ``say`` with ``call`` is a spoken preamble before the call;
- ``mcp``: a call of a remote MCP server's tool, made by the service itself (the session must
  offer a ``type: "mcp"`` tool with that ``server_label``): a table of ``server``, ``tool``,
  ``arguments`` (a table or a string) and what the server answered, ``output`` (a string) or
  ``error`` (its message). When the session's ``require_approval`` asks for it, the reply is
  an ``mcp_approval_request`` (after ``say``, if any) and the call is made once the client
  approves; otherwise the call, then a reply quoting its output (``say`` is not used).

An empty turn (``{}``) is the default beeps; so is every turn past the end of the script. A
reply that answers a tool's output does not use a turn: it quotes the output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2d2voice.localbackend.mcp import McpPlan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Script", "ScriptError", "ScriptTurn", "load_script", "parse_script"]

_KEYS = {"say", "call", "arguments", "hear", "mcp"}
_MCP_KEYS = {"server", "tool", "arguments", "output", "error"}


class ScriptError(ValueError):
    """A script file that cannot be used; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class ScriptTurn:
    """One scripted reply: words, a tool call, both (preamble + call), or neither (beeps)."""

    say: str | None = None
    call: str | None = None
    arguments: str = "{}"
    #: the transcript of the user's utterance number ``turn`` (None: ``(speech, N s)``)
    hear: str | None = None
    #: a remote MCP call the service makes in this reply
    mcp: McpPlan | None = None


@dataclass(frozen=True)
class Script:
    turns: tuple[ScriptTurn, ...] = ()

    def turn(self, number: int) -> ScriptTurn:
        """Turn ``number`` (from 1); past the end, the default beeps."""
        return self.turns[number - 1] if 0 < number <= len(self.turns) else ScriptTurn()


def load_script(path: str | Path) -> Script:
    """The script in ``path`` (``.toml``: TOML, anything else: JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ScriptError(f"{path}: cannot read the script: {why}") from None
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ScriptError(f"{path}: {str(exc).splitlines()[0]}") from None
    return parse_script(data, str(path))


def parse_script(data: Any, where: str = "script") -> Script:
    """A :class:`Script` from decoded JSON/TOML (``where`` names it in errors)."""
    if isinstance(data, dict):
        unknown = set(data) - {"turn", "turns"}
        if unknown:
            raise ScriptError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected 'turn' "
                              "tables in TOML or a 'turns' list in JSON)")
        data = data.get("turns", data.get("turn", []))
    if not isinstance(data, list):
        raise ScriptError(f"{where}: expected a list of turns")
    return Script(tuple(_turn(raw, f"{where}: turn {i}") for i, raw in enumerate(data, 1)))


def _turn(raw: Any, where: str) -> ScriptTurn:
    if not isinstance(raw, dict):
        raise ScriptError(f"{where}: expected a table/object")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ScriptError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: arguments, "
                          "call, hear, mcp, say)")
    say, call, arguments = raw.get("say"), raw.get("call"), raw.get("arguments")
    if say is not None and not isinstance(say, str):
        raise ScriptError(f"{where}: 'say' must be a string")
    hear = raw.get("hear")
    if hear is not None and not isinstance(hear, str):
        raise ScriptError(f"{where}: 'hear' must be a string")
    if call is not None and (not isinstance(call, str) or not call):
        raise ScriptError(f"{where}: 'call' must be a tool name")
    if arguments is not None and call is None:
        raise ScriptError(f"{where}: 'arguments' without 'call'")
    if call is not None and raw.get("mcp") is not None:
        raise ScriptError(f"{where}: 'call' and 'mcp' in one turn (one call a reply)")
    text = _arguments(arguments, where, indent=2)
    mcp = _mcp(raw["mcp"], f"{where}: mcp") if raw.get("mcp") is not None else None
    return ScriptTurn(say, call, text, hear, mcp)


def _arguments(arguments: Any, where: str, indent: int | None = None) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, dict):
        return json.dumps(arguments, indent=indent)
    raise ScriptError(f"{where}: 'arguments' must be a table/object or a string")


def _mcp(raw: Any, where: str) -> McpPlan:
    if not isinstance(raw, dict):
        raise ScriptError(f"{where}: expected a table/object")
    unknown = set(raw) - _MCP_KEYS
    if unknown:
        raise ScriptError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: arguments, "
                          "error, output, server, tool)")
    for key in ("server", "tool"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ScriptError(f"{where}: {key!r} must be a name")
    for key in ("output", "error"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ScriptError(f"{where}: {key!r} must be a string")
    if raw.get("output") is not None and raw.get("error") is not None:
        raise ScriptError(f"{where}: 'output' or 'error', not both")
    return McpPlan(raw["server"], raw["tool"], _arguments(raw.get("arguments"), where),
                   raw.get("output") or "", raw.get("error"))
