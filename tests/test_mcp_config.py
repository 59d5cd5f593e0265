"""``[[mcp]]`` in the tools file: a bad entry is one line naming the file and the server, exit 3;
``r2d2voice tools --check`` connects to nothing, ``r2d2voice tools`` lists what each server
offers (an unreachable one is one line)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from mcp_support import SERVER, stdio_entry
from support import run_cli

from r2d2voice.appliance.tools import load_tools
from r2d2voice.errors import EXIT_CONFIG, ConfigError

GOOD = '[[mcp]]\nname = "home"\nurl = "http://homeassistant.local:8123/api/mcp"\n'


@pytest.mark.parametrize(("entry", "problem"), [
    ('[[mcp]]\nname = "home"\n', "mcp 'home': give exactly one of command (a local server) "
                                 "and url (streamable HTTP)"),
    (GOOD + f'command = ["{sys.executable}"]\n', "mcp 'home': give exactly one of command"),
    ('[[mcp]]\nname = "Home__x"\nurl = "http://h/mcp"\n', "mcp #1: name 'Home__x' must be"),
    (GOOD + 'tool = ["x"]\n', "mcp 'home': unknown key 'tool' (expected name, command, url"),
    (GOOD + 'headers = { Authorization = "Bearer ${HA_TOKEN}" }\n',
     "mcp 'home': headers.Authorization: ${HA_TOKEN} is not set (in the environment or the "
     "env file)"),
    (GOOD + 'tools = ["a"]\nconfirm = ["b"]\n', "mcp 'home': confirm names 'b', which tools "
                                                "does not offer"),
    (GOOD + 'timeout_s = 0\n', "mcp 'home': timeout_s must be a number of seconds"),
    ('[[mcp]]\nname = "home"\nurl = "ftp://h/mcp"\n', "mcp 'home': url must be an http://"),
    ('[[mcp]]\nname = "home"\ncommand = ["/no/such/server"]\n',
     "mcp 'home': command /no/such/server does not exist"),
    ('[[mcp]]\nname = "home"\ncommand = ["/bin/true"]\nremote = true\n',
     "mcp 'home': remote = true needs a url"),
    (GOOD + GOOD, "mcp 'home': duplicate name"),
])
def test_a_bad_entry_is_one_line_naming_file_and_server(tmp_path: Path, entry: str,
                                                        problem: str) -> None:
    path = tmp_path / "tools.toml"
    path.write_text(entry)
    with pytest.raises(ConfigError) as caught:
        load_tools(path, variables={})
    assert str(caught.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(caught.value)
    r = run_cli("tools", "--check", "--tools", str(path), cwd=tmp_path)
    assert r.returncode == EXIT_CONFIG and r.stdout == ""
    assert r.stderr == f"r2d2voice: error: {caught.value}\n"


def test_a_variable_comes_from_the_env_file_and_its_value_is_never_shown(
        tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HA_TOKEN=ey-long-lived\n")
    path = tmp_path / "tools.toml"
    path.write_text(GOOD + 'headers = { Authorization = "Bearer ${HA_TOKEN}" }\n'
                           'confirm = ["unlock"]\n')
    r = run_cli("tools", "--check", "--tools", str(path), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "ok: 0 tools, 1 MCP servers (not connected)\n")
    assert load_tools(path, variables={"HA_TOKEN": "t"}).mcp.specs[0].headers == {
        "Authorization": "Bearer t"}
    assert "ey-long-lived" not in repr(load_tools(path, variables={"HA_TOKEN": "ey-long-lived"})
                                       .mcp.specs)


def test_tools_lists_a_servers_tools_and_an_unreachable_server_in_one_line(
        tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "tools.toml"
    path.write_text('builtins = ["get_time"]\n'
                    + stdio_entry(tmp_path / "calls.log",
                                  extra='tools = ["set_light", "unlock_door"]\n'
                                        'confirm = ["unlock_door"]')
                    + f'[[mcp]]\nname = "garage"\nurl = "http://127.0.0.1:{port}/mcp"\n')
    r = run_cli("tools", "--tools", str(path), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("1 tools in ")
    assert f"mcp home: {sys.executable} {SERVER} — 2 tools (timeout 10 s; confirm: " \
           "unlock_door)" in out
    assert "home__set_light  (mcp home)\n  Switch the light of a room on or off." in out
    assert "    room: string, required" in out
    assert "home__unlock_door  (mcp home, asks for a yes)" in out
    [garage] = [line for line in out.splitlines() if line.startswith("mcp garage")]
    assert garage.startswith(f"mcp garage: http://127.0.0.1:{port}/mcp — not reachable: ")
    assert r.stderr == ""
