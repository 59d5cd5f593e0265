"""R2 remembers, end to end: several conversations in one database against the real local
backend (its ``--script`` calls the memory tools), through the CLI, real SQLite at the bottom.
What the service was told is read from the ``session.update`` the backend received."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from support import SAMPLES, clean_env, cli, local_backend

from r2d2voice.localbackend.script import Script, ScriptTurn

ZONE = "Pacific/Auckland"  # far from UTC: the days shown are local days
SAID = "Noted: your dog Biscuit loves digging in the garden."
FACT = "The dog is called Biscuit."


def turn(call: str | None = None, say: str | None = None, **arguments: Any) -> ScriptTurn:
    return ScriptTurn(say=say, call=call, arguments=json.dumps(arguments))


def today() -> str:
    return datetime.now(ZoneInfo(ZONE)).date().isoformat()


class Conversation:
    """One ``replay`` of the two-turn sample against a local backend running ``script``:
    the CLI's result and every client event the backend received."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.result: Any = None

    @classmethod
    async def hold(cls, tmp_path: Path, db: Path, *turns: ScriptTurn, **env: str) -> Conversation:
        self = cls()
        async with local_backend(realtime_factor=20, script=Script(turns),
                                 observer=lambda _sid, event: self.events.append(event)) as url:
            self.result = await cli(
                "replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--url", url,
                "--db", str(db), cwd=tmp_path,
                env=clean_env(HOME=str(tmp_path), TZ=ZONE, **env))
        assert self.result.returncode == 0, self.result.stderr.decode()
        return self

    @property
    def session(self) -> dict[str, Any]:
        [update] = [e for e in self.events if e.get("type") == "session.update"]
        return update["session"]

    def outputs(self) -> list[dict[str, Any]]:
        """The tool outputs the robot sent back, decoded."""
        return [json.loads(e["item"]["output"]) for e in self.events
                if e.get("type") == "conversation.item.create"
                and e["item"].get("type") == "function_call_output"]


def remembered_facts(instructions: str) -> list[dict[str, str]]:
    inside = instructions.split("<remembered_facts>", 1)[1].split("</remembered_facts>", 1)[0]
    return [json.loads(line) for line in inside.strip().splitlines()]


async def test_the_record_becomes_the_robots_memory(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    first = await Conversation.hold(tmp_path, db, turn(say=SAID), turn("remember", fact=FACT))
    # the memory tools, with exactly these names and arguments, offered from the start
    tools = {t["name"]: t["parameters"] for t in first.session["tools"]}
    assert tools["remember"]["required"] == ["fact"]
    assert tools["remember"]["properties"]["fact"]["type"] == "string"
    assert tools["remember"]["properties"]["fact"]["maxLength"] == 500
    for name in ("recall", "forget"):
        assert tools[name]["required"] == ["query"]
        assert set(tools[name]["properties"]) == {"query"}
    assert "This is the first conversation on record." in first.session["instructions"]
    assert remembered_facts(first.session["instructions"]) == []
    assert first.outputs() == [{"id": 1, "kept": FACT}]

    # the next conversation starts knowing the fact, and when they last talked
    second = await Conversation.hold(tmp_path, db, turn("recall", query="Biscuit garden"))
    instructions = second.session["instructions"]
    assert instructions.startswith("You are R2")  # the persona first, then the memory
    assert remembered_facts(instructions) == [{"day": today(), "fact": FACT}]
    assert "You last talked earlier today" in instructions
    # recall finds the fact and the earlier conversation's words, with their day
    [found] = second.outputs()
    assert found["facts"] == [{"id": 1, "day": today(), "fact": FACT}]
    assert {"day": today(), "who": "assistant", "words": SAID} in found["conversations"]

    # forget: out of the instructions and out of recall ...
    third = await Conversation.hold(tmp_path, db, turn("forget", query="biscuit"))
    [done] = third.outputs()
    assert done["forgotten_facts"] == [{"id": 1, "fact": FACT}]
    assert done["passages_excluded"] >= 2  # what was said, and the recall quoted back
    fourth = await Conversation.hold(tmp_path, db, turn("recall", query="Biscuit"))
    assert "Biscuit" not in fourth.session["instructions"]
    [after] = fourth.outputs()
    assert after["facts"] == []
    # what was said before the forget is out; what was said after it is new speech (here the
    # backend quoting the forget's own output back)
    assert after["conversations"] and all("tool forget said" in c["words"]
                                          for c in after["conversations"])
    # ... while the record still holds what was said
    export = await cli("export", "--db", str(db), cwd=tmp_path)
    rows = [json.loads(line) for line in export.stdout.decode().splitlines()]
    assert SAID in [r.get("text") for r in rows]
    assert len({r["session_id"] for r in rows}) == 4


async def test_privacy_mode_has_no_memory_at_all(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    quiet = await Conversation.hold(tmp_path, db, turn(say=SAID), turn("remember", fact=FACT),
                                    R2D2_STORE_TEXT="false")
    assert "tools" not in quiet.session or quiet.session["tools"] == []
    assert "remembered_facts" not in quiet.session["instructions"]
    assert quiet.outputs() == []  # no tools offered: the scripted call is not made
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM facts").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages_fts").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 4
    finally:
        conn.close()


async def test_memory_off_and_tools_beside_it(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    off = await Conversation.hold(tmp_path, db, turn(say="hi"), R2D2_MEMORY="off")
    assert "tools" not in off.session or off.session["tools"] == []
    assert "remembered_facts" not in off.session["instructions"]
    tools = tmp_path / "tools.toml"
    tools.write_text('builtins = ["get_time"]\n')
    both = await Conversation.hold(tmp_path, db, turn(say="hi"), R2D2_TOOLS=str(tools))
    assert [t["name"] for t in both.session["tools"]] == ["get_time", "remember", "recall",
                                                         "forget"]


async def test_a_tool_named_like_a_memory_tool_is_a_configuration_error(tmp_path: Path) -> None:
    tools = tmp_path / "tools.toml"
    tools.write_text('[[tool]]\nname = "recall"\ncommand = ["/bin/true"]\n')
    r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--db",
                  str(tmp_path / "r2.db"), "--tools", str(tools), cwd=tmp_path)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 3
    assert err[-1] == (f"r2d2voice: error: {tools}: tool 'recall': the name of a memory tool "
                       "(R2D2_MEMORY is on); rename it, or set R2D2_MEMORY=off")
