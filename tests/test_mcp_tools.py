"""MCP servers as tools, against real servers written with the SDK (tests/mcp_server.py): one as
a stdio process of the run, one on streamable HTTP on a loopback port. What the model is
offered, what reaches the server, and what the model is told when the server fails."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from mcp_support import calls, group_alive, http_server, stdio_entry
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter

from r2d2voice.appliance.tools import ToolContext, load_tools
from r2d2voice.appliance.tools.process import OUTPUT_CAP
from r2d2voice.appliance.tools.runner import Toolbox

READY_S = 60.0  # a generous bound for a Python server to start on a loaded machine


def toolbox(tmp_path: Path, text: str, **variables: str) -> Toolbox:
    path = tmp_path / "tools.toml"
    path.write_text(text)
    return load_tools(path, variables=variables)


async def ready(box: Toolbox, name: str = "home") -> None:
    """Until server ``name`` offers its tools (the run itself never waits like this)."""
    assert box.mcp is not None
    with trio.fail_after(READY_S):
        while box.mcp.servers[name].state != "ready":
            await box.changed(box.version)


async def call(box: Toolbox, name: str, arguments: str = "{}", **context: Any) -> Any:
    return await box.call(name, arguments, context=ToolContext("c1", **context))


async def test_a_stdio_server_offers_its_own_schemas_and_a_valid_call_reaches_it(
        tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    box = toolbox(tmp_path, 'builtins = ["get_time"]\n' + stdio_entry(log))
    assert [t["name"] for t in box.session_tools()] == ["get_time"]  # not connected yet
    async with box.running():
        await ready(box)
        offered = {t["name"]: t for t in box.session_tools()}
        assert "home__set_light" in offered and "home__unlock_door" in offered
        light = offered["home__set_light"]
        assert light["type"] == "function"
        assert light["description"] == "Switch the light of a room on or off."
        # the server's own input schema, as it listed it
        assert light["parameters"]["required"] == ["room", "on"]
        assert light["parameters"]["properties"]["brightness"] == {
            "default": 100, "title": "Brightness", "type": "integer"}
        TypeAdapter(RealtimeClientEvent).validate_python(
            {"type": "session.update", "session": {"type": "realtime", "tool_choice": "auto",
                                                   "tools": list(offered.values())}})
        result = await call(box, "home__set_light", '{"room": "kitchen", "on": true}')
        assert (result.status, result.output) == ("ok", "the kitchen light is on")
        assert calls(log) == [{"tool": "set_light", "room": "kitchen", "on": True,
                               "brightness": 100}]


async def test_invalid_arguments_are_refused_before_anything_reaches_the_server(
        tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    box = toolbox(tmp_path, stdio_entry(log))
    async with box.running():
        await ready(box)
        bad = await call(box, "home__set_light", '{"room": 3, "on": true}')
        missing = await call(box, "home__set_light", '{"room": "hall"}')
        junk = await call(box, "home__set_light", "{room")
        unknown = await call(box, "home__open_garage")
    assert (bad.status, bad.output) == ("rejected", "invalid arguments: room must be a string")
    assert missing.output == "invalid arguments: on is required"
    assert junk.status == "rejected" and junk.output.startswith("invalid arguments: not valid")
    assert unknown.status == "rejected" and "home__set_light" in unknown.output
    assert calls(log) == []


async def test_an_error_result_a_long_result_and_the_servers_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-for-a-tool")
    box = toolbox(tmp_path, stdio_entry(tmp_path / "calls.log"))
    async with box.running():
        await ready(box)
        broken = await call(box, "home__broken_bulb")
        big = await call(box, "home__big")
        env = await call(box, "home__environment")
    assert broken.status == "error" and "the bulb in the hall is burnt out" in broken.output
    assert big.status == "ok" and big.output.endswith("…[output cut at 16 KiB]")
    assert len(big.output.encode()) <= OUTPUT_CAP + 40
    # PATH, LANG, HOME and its [mcp.env]: nothing else of ours (no API key)
    assert set(env.output.split()) <= {"PATH", "LANG", "HOME", "LC_ALL", "LC_CTYPE",
                                       "MCP_TEST_LOG"}
    assert {"PATH", "HOME", "MCP_TEST_LOG"} <= set(env.output.split())


async def test_a_call_past_its_timeout_is_cancelled_at_the_server(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    box = toolbox(tmp_path, stdio_entry(log, extra="timeout_s = 1"))
    async with box.running():
        await ready(box)
        result = await call(box, "home__slow", '{"seconds": 30}')
        assert (result.status, result.output) == ("timeout",
                                                  "timed out after 1 s and was cancelled")
        with trio.fail_after(READY_S):  # MCP's notifications/cancelled reached the server
            while {"tool": "slow-cancelled"} not in calls(log):
                await trio.sleep(0.05)
        after = await call(box, "home__set_light", '{"room": "hall", "on": false}')
    assert after.status == "ok"  # the server goes on serving


async def test_a_crashed_server_is_an_error_the_model_can_act_on_and_comes_back(
        tmp_path: Path) -> None:
    box = toolbox(tmp_path, stdio_entry(tmp_path / "calls.log"))
    assert box.mcp is not None
    server = box.mcp.servers["home"]
    async with box.running():
        await ready(box)
        assert server.process is not None
        first = server.process.pid
        crashed = await call(box, "home__crash")
        assert crashed.status == "error" and "went away during the call" in crashed.output
        with trio.fail_after(READY_S):
            while server.state == "ready":
                await box.changed(box.version)
        down = await call(box, "home__set_light", '{"room": "hall", "on": true}')
        assert down.status == "error" and "not available right now" in down.output
        assert "home__set_light" not in {t["name"] for t in box.session_tools()}
        await ready(box)  # restarted: a new process, the same tools
        assert server.process is not None and server.process.pid != first
        assert server.restarts == 1 and not group_alive(first)
        again = await call(box, "home__set_light", '{"room": "hall", "on": true}')
    assert again.status == "ok"


async def test_no_server_process_outlives_the_run(tmp_path: Path) -> None:
    box = toolbox(tmp_path, stdio_entry(tmp_path / "calls.log"))
    assert box.mcp is not None
    async with box.running():
        await ready(box)
        assert box.mcp.servers["home"].process is not None
        pid = box.mcp.servers["home"].process.pid
        assert os.getpgid(pid) == pid  # its own process group
        assert group_alive(pid)
    assert not group_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    assert box.session_tools() == []


async def test_a_tools_list_change_is_followed(tmp_path: Path) -> None:
    box = toolbox(tmp_path, stdio_entry(tmp_path / "calls.log"))
    async with box.running():
        await ready(box)
        version = box.version
        assert "home__scene" not in {t["name"] for t in box.session_tools()}
        assert (await call(box, "home__add_scene")).output == "added"
        with trio.fail_after(READY_S):
            await box.changed(version)
        assert "home__scene" in {t["name"] for t in box.session_tools()}
        scene = await call(box, "home__scene", '{"name": "evening"}')
    assert (scene.status, scene.output) == ("ok", "scene evening started")


async def test_the_allowlist_offers_only_what_it_names(tmp_path: Path) -> None:
    box = toolbox(tmp_path, stdio_entry(tmp_path / "calls.log", extra='tools = ["set_light"]'))
    async with box.running():
        await ready(box)
        assert [t["name"] for t in box.session_tools()] == ["home__set_light"]
        refused = await call(box, "home__unlock_door", '{"door": "front"}')
    assert refused.status == "rejected"
    assert calls(tmp_path / "calls.log") == []


async def test_streamable_http_with_a_token_from_a_variable_never_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    entry = '[[mcp]]\nname = "hass"\nurl = "{url}"\n' \
            'headers = {{ Authorization = "Bearer ${{HA_TOKEN}}" }}\n'
    with http_server(tmp_path, token="s3cret-token") as url:
        box = toolbox(tmp_path, entry.format(url=url), HA_TOKEN="s3cret-token")
        async with box.running():
            await ready(box, "hass")
            result = await call(box, "hass__set_light", '{"room": "garden", "on": true}')
        assert (result.status, result.output) == ("ok", "the garden light is on")
        wrong = toolbox(tmp_path, entry.format(url=url), HA_TOKEN="not-the-token")
        assert wrong.mcp is not None
        async with wrong.running():
            await wrong.mcp.wait_ready(READY_S)
            refused = await call(wrong, "hass__set_light", '{"room": "garden", "on": true}')
        assert wrong.mcp.servers["hass"].state == "starting"  # left: not running any more
    assert refused.status == "error" and "not available right now" in refused.output
    assert "s3cret-token" not in caplog.text and "not-the-token" not in caplog.text


async def test_a_server_down_at_start_leaves_the_rest_working(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    box = toolbox(tmp_path, f'builtins = ["get_time"]\n[[mcp]]\nname = "hass"\n'
                            f'url = "http://127.0.0.1:{port}/mcp"\n')
    assert box.mcp is not None
    async with box.running():
        await box.mcp.wait_ready(READY_S)
        server = box.mcp.servers["hass"]
        assert server.state == "down" and server.problem
        assert [t["name"] for t in box.session_tools()] == ["get_time"]
        down = await call(box, "hass__set_light", '{"room": "garden", "on": true}')
        clock = await call(box, "get_time")
    assert down.status == "error"
    assert down.output.startswith("the hass server is not available right now (")
    assert clock.status == "ok"


async def test_restarts_back_off_on_the_mock_clock(
        thread_clock: trio.testing.MockClock, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    program = tmp_path / "gone-server"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    box = toolbox(tmp_path, f'[[mcp]]\nname = "gone"\ncommand = ["{program}"]\n')
    program.unlink()  # valid when read, gone when started: every start fails at once
    # (thread_clock: time jumps only once trio has been idle for 100 ms of real time, so the
    # worker thread that spawns the process is never skipped past)
    assert box.mcp is not None
    server = box.mcp.servers["gone"]
    caplog.set_level(logging.WARNING, "r2d2voice.appliance.tools.mcp")
    async with box.running():
        # restarts after 1, 2, 4, … 60 s: the 8th at 1+2+4+8+16+32+60+60 = 183 s
        await trio.sleep(182.5)
        assert server.restarts == 7 and server.state == "down"
        await trio.sleep(1.0)
        assert server.restarts == 8
    delays = [r.getMessage().rsplit("again in ", 1)[1] for r in caplog.records
              if "trying again" in r.getMessage()]
    assert delays[:8] == ["1 s", "2 s", "4 s", "8 s", "16 s", "32 s", "60 s", "60 s"]
    assert "could not start" in (server.problem or caplog.records[0].getMessage())
