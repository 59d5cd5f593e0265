"""End to end: ``r2d2voice replay … --backend local --tools FILE`` against the local backend's
script, with a real MCP server (tests/mcp_server.py over stdio) as the robot's hands: the run
does not wait for the server (its tools are offered when it is ready), a call reaches it, a
``confirm`` tool waits for the person's yes, and the audit trail has every call."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import soundfile as sf
from fake_service import speech
from mcp_support import calls, processes_with_env, stdio_entry
from support import cli, local_backend

from r2d2voice.localbackend.script import Script, ScriptTurn


def turn(hear: str, say: str | None = None, call: str | None = None,
         **arguments: Any) -> ScriptTurn:
    return ScriptTurn(say=say, call=call, arguments=json.dumps(arguments), hear=hear)


async def test_mcp_tools_and_a_confirmed_call_end_to_end(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    tools = tmp_path / "tools.toml"
    tools.write_text(stdio_entry(log, extra='confirm = ["unlock_door"]'))
    wav = tmp_path / "asks.wav"
    # four utterances; the long pause after the first gives the server time to start
    sf.write(wav, speech(1.0, 8.0, 1.0, 2.0, 1.0, 3.0, 1.0, 3.0), 24000)
    # ``say``/``call`` are per reply, ``hear`` per utterance: reply 4 is the question the
    # held call has the model ask, utterance 4 the person's answer
    script = Script((
        turn("hello", say="Hi."),
        turn("turn on the kitchen light", call="home__set_light", room="kitchen", on=True),
        turn("unlock the front door", call="home__unlock_door", door="front"),
        turn("yes please", say="Shall I unlock the front door?"),
        turn("", say="Okay."),
    ))
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20, script=script) as url:
        r = await cli("replay", str(wav), "--backend", "local", "--url", url, "--db", str(db),
                      "--speed", "realtime", "--tools", str(tools), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    # the light call reached the server; the door only after the person's yes
    assert [c["tool"] for c in calls(log)] == ["set_light", "unlock_door"]
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, status, output FROM tool_executions ORDER BY seq").fetchall()
    said = [tuple(row) for row in con.execute(
        "SELECT role, text FROM messages ORDER BY seq")]
    con.close()
    assert rows == [("home__set_light", "ok", "the kitchen light is on"),
                    ("home__unlock_door", "ok", "the front door is unlocked")]
    assistant = [text for role, text in said if role == "assistant"]
    user = [text for role, text in said if role == "user"]
    assert user == ["hello", "turn on the kitchen light", "unlock the front door",
                    "yes please"]
    # the model heard each output: its next reply quotes it; it asked before the door opened
    assert any("(tool home__set_light said: the kitchen light is on)" in t for t in assistant)
    asked = assistant.index("Shall I unlock the front door?")
    opened = next(i for i, t in enumerate(assistant)
                  if "(tool home__unlock_door said: the front door is unlocked)" in t)
    assert asked < opened
    # the server process ended with the run: none has this test's log in its environment
    assert processes_with_env(f"MCP_TEST_LOG={log}") == []
