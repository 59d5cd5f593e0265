"""End to end: ``r2d2voice replay … --backend local --tools FILE`` against the local backend's
script, with a real MCP server (tests/mcp_server.py over stdio) as the robot's hands: the run
does not wait for the server (its tools are offered when it is ready), a call reaches it, a
``confirm`` tool waits for the person's yes, and the audit trail has every call. A remote
server goes to the service (the local backend's scripted ``mcp``): its approval request waits
for the person's yes too, and the call the service then makes is in the audit, in every
export format and in ``stats``."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import soundfile as sf
from fake_service import speech
from mcp_support import calls, processes_with_env, stdio_entry
from support import cli, local_backend

from r2d2voice.localbackend.mcp import McpPlan
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
    stats = await cli("stats", "--format", "json", "--db", str(db), cwd=tmp_path)
    assert json.loads(stats.stdout)["tools"]["by_tool"] == {
        "home__set_light": {"ok": 1}, "home__unlock_door": {"ok": 1}}


REMOTE = """
[[mcp]]
name = "shop"
url = "https://shop.example/mcp"
remote = true
tools = ["browse", "buy"]
confirm = ["buy"]
"""


async def test_a_remote_call_waits_for_the_persons_yes_and_is_in_every_report(
        tmp_path: Path) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text(REMOTE)
    wav = tmp_path / "asks.wav"
    sf.write(wav, speech(1.0, 4.0, 1.0, 4.0), 24000)
    # reply 1 is the service's approval request, reply 2 the question the held call has the
    # model ask, utterance 2 the person's answer; the service goes on once it is approved
    script = Script((
        ScriptTurn(hear="buy some milk",
                   mcp=McpPlan("shop", "buy", '{"item": "milk"}', output="ordered 1 milk")),
        ScriptTurn(hear="yes please", say="Shall I buy milk?"),
        ScriptTurn(say="Okay."),
    ))
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20, script=script) as url:
        r = await cli("replay", str(wav), "--backend", "local", "--url", url, "--db", str(db),
                      "--speed", "realtime", "--tools", str(tools), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, status, arguments, output FROM tool_executions"
                       ).fetchall()
    said = [text for (text,) in con.execute(
        "SELECT text FROM messages WHERE role = 'assistant' ORDER BY seq")]
    con.close()
    assert rows == [("shop__buy", "ok", '{"item": "milk"}', "ordered 1 milk")]
    asked = said.index("Shall I buy milk?")
    bought = said.index("*beep* (tool shop.buy said: ordered 1 milk)")
    assert asked < bought  # the call came only after the question and the yes

    async def report(*args: str) -> str:
        done = await cli(*args, "--db", str(db), cwd=tmp_path)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    [jsonl] = [json.loads(line) for line in (await report("export")).splitlines()
               if json.loads(line)["role"] == "tool"]
    assert (jsonl["name"], jsonl["status"], jsonl["output"]) == ("shop__buy", "ok",
                                                                  "ordered 1 milk")
    assert jsonl["arguments"] == '{"item": "milk"}'
    [row] = [r for r in csv.DictReader(io.StringIO(await report("export", "--format", "csv")))
             if r["role"] == "tool"]
    assert (row["name"], row["status"], row["output"]) == ("shop__buy", "ok", "ordered 1 milk")
    markdown = await report("export", "--format", "markdown")
    assert "🔧 **shop\\_\\_buy**" in markdown and "ordered 1 milk (ok" in markdown
    stats = json.loads(await report("stats", "--format", "json"))
    assert stats["tools"] == {"calls": 1, "by_tool": {"shop__buy": {"ok": 1}}}
    assert "shop__buy" in await report("stats")
