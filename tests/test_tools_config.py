"""The tools file: a valid one becomes GA ``session.update`` tools; every invalid one is a
ConfigError (exit 3) in one line naming the file, the tool and the problem."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter

from r2d2voice.appliance.tools import load_tools
from r2d2voice.appliance.tools.describe import tools_command
from r2d2voice.errors import EXIT_CONFIG, ConfigError

HEAD = """
[[tool]]
name = "turn_head"
description = "Turn R2's dome to a heading in degrees (negative is left)."
command = ["./r2-head"]
timeout_s = 5
[tool.parameters]
type = "object"
required = ["degrees"]
[tool.parameters.properties.degrees]
type = "integer"
minimum = -180
maximum = 180
"""


def tools_file(tmp_path: Path, text: str, *, program: str = "r2-head") -> Path:
    """``tools.toml`` with ``text`` beside an executable ``program``."""
    exe = tmp_path / program
    exe.write_text("#!/bin/sh\necho ok\n")
    exe.chmod(0o755)
    path = tmp_path / "tools.toml"
    path.write_text(text)
    return path


def test_valid_file_offers_builtins_and_commands_in_ga_session_update(tmp_path: Path) -> None:
    path = tools_file(tmp_path, 'builtins = ["get_time", "end_conversation"]\n' + HEAD
                      + '[[tool]]\nname = "beep"\ncommand = ["./r2-head", "--beep"]\n')
    box = load_tools(path)
    tools = box.session_tools()
    assert [t["name"] for t in tools] == ["get_time", "end_conversation", "turn_head", "beep"]
    head = tools[2]
    assert head == {"type": "function", "name": "turn_head",
                    "description": "Turn R2's dome to a heading in degrees (negative is left).",
                    "parameters": {"type": "object", "required": ["degrees"], "properties": {
                        "degrees": {"type": "integer", "minimum": -180, "maximum": 180}}}}
    # a relative command is relative to the tools file
    assert box.command_of("turn_head").command == (str(tmp_path / "r2-head"),)
    assert box.command_of("turn_head").timeout_s == 5
    assert box.command_of("get_time") is None
    event = {"type": "session.update",
             "session": {"type": "realtime", "tools": tools, "tool_choice": "auto"}}
    parsed = TypeAdapter(RealtimeClientEvent).validate_python(event)
    assert [t.name for t in parsed.session.tools] == [t["name"] for t in tools]
    assert parsed.session.tools[2].parameters == head["parameters"]


def test_bare_command_is_found_on_path_and_default_timeout_is_10s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tools_file(tmp_path, '[[tool]]\nname = "beep"\ncommand = ["r2-head", "-v"]\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    spec = load_tools(path).command_of("beep")
    assert spec.command == (str(tmp_path / "r2-head"), "-v")
    assert spec.timeout_s == 10


BAD = {
    "toml error": ('builtins = []\n[[tool]]\nname = turn_head\ncommand = ["./r2-head"]\n',
                   ["not valid TOML", "line 3"]),
    "duplicate": (HEAD + HEAD, ["'turn_head'", "duplicate name"]),
    "duplicate builtin": ('builtins = ["get_time"]\n[[tool]]\nname = "get_time"\n'
                          'command = ["./r2-head"]\n', ["'get_time'", "duplicate name"]),
    "bad schema": (HEAD.replace('type = "integer"', 'type = "integr"'),
                   ["'turn_head'", "not a valid JSON Schema", "properties.degrees.type"]),
    "schema not object": (HEAD.replace('type = "object"', 'type = "array"'),
                          ["'turn_head'", 'type = "object"']),
    "missing command": (HEAD.replace("./r2-head", "./r2-neck"),
                        ["'turn_head'", "r2-neck does not exist"]),
    "not on PATH": (HEAD.replace("./r2-head", "r2-no-such-program"),
                    ["'turn_head'", "'r2-no-such-program' is not on PATH"]),
    "empty command": (HEAD.replace('["./r2-head"]', "[]"), ["'turn_head'", "command must be"]),
    "unknown builtin": ('builtins = ["get_time", "fly"]\n', ["builtins", "unknown built-in 'fly'"]),
    "zero timeout": (HEAD.replace("timeout_s = 5", "timeout_s = 0"), ["'turn_head'", "timeout_s"]),
    "text timeout": (HEAD.replace("timeout_s = 5", 'timeout_s = "5"'),
                     ["'turn_head'", "timeout_s", "'5'"]),
    "unknown key": (HEAD.replace("timeout_s = 5", "timeout = 5"),
                    ["'turn_head'", "unknown key 'timeout'"]),
    "bad name": ('[[tool]]\nname = "turn head"\ncommand = ["./r2-head"]\n',
                 ["tool #1", "'turn head' must match"]),
    "no name": ('[[tool]]\ncommand = ["./r2-head"]\n', ["tool #1", "name is missing"]),
    "date in schema": (HEAD + "[tool.parameters.properties.when]\ndefault = 2024-01-01\n",
                       ["'turn_head'", "date"]),
}


@pytest.mark.parametrize("text,expected", BAD.values(), ids=BAD.keys())
def test_invalid_tools_file_is_one_line_config_error(tmp_path: Path, text: str,
                                                     expected: list[str]) -> None:
    path = tools_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tools(path)
    message = str(info.value)
    assert info.value.exit_code == EXIT_CONFIG == 3
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message


def test_command_that_is_not_executable(tmp_path: Path) -> None:
    path = tools_file(tmp_path, HEAD)
    exe = tmp_path / "r2-head"
    exe.chmod(exe.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    with pytest.raises(ConfigError, match=r"tool 'turn_head': command .*r2-head is not executable"):
        load_tools(path)


def test_missing_tools_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tools file .*nope\.toml does not exist$"):
        load_tools(tmp_path / "nope.toml")


def test_tools_command_lists_schema_and_check_counts(tmp_path: Path) -> None:
    path = tools_file(tmp_path, 'builtins = ["set_volume"]\n' + HEAD)
    out = io.StringIO()
    tools_command(path, True, out)
    assert out.getvalue() == "ok: 2 tools\n"
    out = io.StringIO()
    tools_command(path, False, out)
    text = out.getvalue()
    assert "set_volume  (built-in)" in text
    assert "percent: integer, required, minimum 0, maximum 100" in text
    assert f"turn_head  {tmp_path / 'r2-head'}  (timeout 5 s)" in text
    assert "degrees: integer, required, minimum -180, maximum 180" in text
    with pytest.raises(ConfigError):
        tools_command(tools_file(tmp_path, HEAD + HEAD), True, io.StringIO())
