"""Function tools on the local backend: ``session.tools`` checked as the service does, scripted
turns that speak or call a tool (``--script``), the GA function-call events, the reply to a
``function_call_output``; sans-IO, over the wire on MockClock, and with the openai SDK's own
realtime client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from localpeer import Peer, first, turn_audio, types
from localwire import backend, in_memory

from r2d2voice.localbackend.command import BackendOptionError, backend_config
from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.script import Script, ScriptError, ScriptTurn, load_script

TURN_HEAD = {"type": "function", "name": "turn_head", "description": "Turn R2's dome.",
             "parameters": {"type": "object", "required": ["degrees"],
                            "properties": {"degrees": {"type": "integer"}}}}
SCRIPT = Script((
    ScriptTurn(say="hello"),
    ScriptTurn(say="Turning my head.", call="turn_head",
               arguments=json.dumps({"degrees": -90}, indent=2)),
    ScriptTurn(),
))
TRANSCRIPT_DONE = "response.output_audio_transcript.done"


def tool_peer(script: Script = SCRIPT, **session: Any) -> Peer:
    p = Peer(script=script)
    [updated] = p.send("session.update", session={"type": "realtime", "tools": [TURN_HEAD],
                                                  "tool_choice": "auto", **session})
    assert updated["type"] == "session.updated", updated
    return p


def said(events: list[dict[str, Any]]) -> str:
    return first(events, TRANSCRIPT_DONE)["transcript"]


# --------------------------------------------------------------------------- the loop


def test_a_scripted_tool_loop_event_by_event():
    p = tool_peer()
    p.send("response.create")
    assert said(p.stream()) == "hello"  # turn 1

    p.append(turn_audio(0.8))  # turn 2: a preamble, then the call
    events = p.stream()
    order = [t for t in types(events) if not t.startswith("response.output_audio")]
    assert order == [
        "response.created",
        "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.content_part.done", "response.output_item.done", "conversation.item.done",
        "response.output_item.added", "conversation.item.added",
        *["response.function_call_arguments.delta"] * order.count(
            "response.function_call_arguments.delta"),
        "response.function_call_arguments.done", "response.output_item.done",
        "conversation.item.done", "response.done",
    ]
    assert said(events) == "Turning my head."
    added = [e for e in events if e["type"] == "response.output_item.added"][1]
    call = added["item"]
    assert (call["type"], call["name"], call["arguments"], added["output_index"]) == (
        "function_call", "turn_head", "", 1)
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and {d["call_id"] for d in deltas} == {call["call_id"]}
    arguments = "".join(d["delta"] for d in deltas)
    assert arguments == '{\n  "degrees": -90\n}'  # whitespace and newlines included
    done = first(events, "response.function_call_arguments.done")
    assert (done["arguments"], done["name"], done["call_id"]) == (arguments, "turn_head",
                                                                   call["call_id"])
    response = events[-1]["response"]
    assert response["status"] == "completed"
    assert [o["type"] for o in response["output"]] == ["message", "function_call"]
    assert response["output"][1] == {**call, "status": "completed", "arguments": arguments}

    [error] = p.send("conversation.item.create", item={
        "type": "function_call_output", "call_id": "call_unknown", "output": "?"})
    assert error["error"]["param"] == "item.call_id"
    added, _ = p.send("conversation.item.create", item={
        "type": "function_call_output", "call_id": call["call_id"], "output": "turned to -90"})
    assert added["item"]["type"] == "function_call_output"
    assert added["previous_item_id"] == call["id"]
    p.send("response.create")
    assert said(p.stream()) == "*beep* (tool turn_head said: turned to -90)"

    p.send("response.create")  # turn 3: the default beeps, as is every turn after the script
    assert "R2 answers in beeps" in said(p.stream())
    p.send("response.create")
    assert "R2 answers in beeps" in said(p.stream())


def test_a_call_without_preamble_and_a_second_output_while_replying():
    p = tool_peer(Script((ScriptTurn(call="turn_head", arguments='{"degrees": 45}'),)))
    p.send("response.create")
    events = p.stream()
    assert TRANSCRIPT_DONE not in types(events)  # no audio at all
    [call] = events[-1]["response"]["output"]
    assert call["type"] == "function_call" and call["arguments"] == '{"degrees": 45}'
    p.send("conversation.item.create", item={
        "type": "function_call_output", "call_id": call["call_id"], "output": "turned to 45"})
    p.send("response.create")
    p.stream(chunks=2)
    [error] = p.send("response.create")  # the quoting reply is still going
    assert error["error"]["code"] == "conversation_already_has_active_response"
    assert said(p.stream()) == "*beep* (tool turn_head said: turned to 45)"


def test_no_call_unless_the_session_offers_tools():
    turn = ScriptTurn(say="I would turn.", call="turn_head", arguments="{}")
    p = Peer(script=Script((turn, turn)))
    p.send("response.create")
    events = p.stream()
    assert [o["type"] for o in events[-1]["response"]["output"]] == ["message"]
    assert said(events) == "I would turn."
    p = tool_peer(Script((turn,)), tool_choice="none")
    p.send("response.create")
    assert "response.function_call_arguments.done" not in types(p.stream())


def test_a_call_cut_short_is_incomplete_and_never_final():
    p = Peer(script=Script((ScriptTurn(call="turn_head", arguments='{"degrees": 10}'),)),
             faults=Faults(fail_responses=((1, "max_output_tokens"),)))
    p.send("session.update", session={"type": "realtime", "tools": [TURN_HEAD]})
    p.send("response.create")
    events = p.stream()
    assert "response.function_call_arguments.done" not in types(events)
    [call] = events[-1]["response"]["output"]
    assert call["status"] == "incomplete" and call["arguments"] == '{"degre'


def test_a_scripted_call_may_name_a_tool_the_session_lacks():
    p = tool_peer(Script((ScriptTurn(call="teleport", arguments="not json {"),)))
    p.send("response.create")
    [call] = p.stream()[-1]["response"]["output"]
    assert (call["name"], call["arguments"]) == ("teleport", "not json {")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("session", "param"), [
    ({"tools": {"name": "x"}}, "session.tools"),
    ({"tools": [{"type": "file_search"}]}, "session.tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "session.tools[0].server_url"),
    ({"tools": [{"type": "mcp", "server_url": "https://x.example/mcp"}]},
     "session.tools[0].server_label"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x.example/mcp",
                 "require_approval": "sometimes"}]}, "session.tools[0].require_approval"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x.example/mcp",
                 "allowed_tools": "buy"}]}, "session.tools[0].allowed_tools"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x.example/mcp",
                 "approval": "never"}]}, "session.tools[0].approval"),
    ({"tools": [{"type": "function"}]}, "session.tools[0].name"),
    ({"tools": [{"type": "function", "name": "turn head"}]}, "session.tools[0].name"),
    ({"tools": [{"type": "function", "name": "x" * 65}]}, "session.tools[0].name"),
    ({"tools": [TURN_HEAD, TURN_HEAD]}, "session.tools[1].name"),
    ({"tools": [{**TURN_HEAD, "strict": True}]}, "session.tools[0].strict"),
    ({"tools": [{**TURN_HEAD, "parameters": {"type": "array"}}]}, "session.tools[0].parameters"),
    ({"tools": [{**TURN_HEAD, "description": 7}]}, "session.tools[0].description"),
    ({"tool_choice": "sometimes"}, "session.tool_choice"),
    ({"tool_choice": {"type": "function", "name": "fly"}}, "session.tool_choice"),
])
def test_tools_are_checked_as_the_service_does(session, param):
    p = Peer()
    [error] = p.send("session.update", session={"type": "realtime", **session})
    assert error["type"] == "error" and error["error"]["param"] == param
    assert p.session.session["tools"] == []


def test_tool_choice_names_an_offered_tool():
    p = tool_peer(tool_choice={"type": "function", "name": "turn_head"})
    assert p.session.session["tool_choice"] == {"type": "function", "name": "turn_head"}
    [error] = p.send("session.update", session={"type": "realtime", "tools": []})
    assert error["error"]["param"] == "session.tool_choice"  # it would name a tool gone


# --------------------------------------------------------------------------- script files


def test_script_files_json_and_toml(tmp_path: Path):
    toml = tmp_path / "turns.toml"
    toml.write_text('[[turn]]\nsay = "hello"\n\n[[turn]]\nsay = "Turning my head."\n'
                    'call = "turn_head"\narguments = { degrees = -90 }\n\n[[turn]]\n')
    as_json = tmp_path / "turns.json"
    as_json.write_text(json.dumps([{"say": "hello"}, {
        "say": "Turning my head.", "call": "turn_head", "arguments": {"degrees": -90}}, {}]))
    assert load_script(toml) == load_script(as_json) == SCRIPT
    assert backend_config(script=str(toml)).script == SCRIPT
    assert load_script(as_json).turn(7) == ScriptTurn()


@pytest.mark.parametrize(("name", "text", "why"), [
    ("bad.json", "[{", "Expecting"),
    ("bad.toml", "[[turn]\n", "line 1"),
    ("key.json", '[{"shout": "hi"}]', "turn 1: unknown key 'shout'"),
    ("args.json", '[{"arguments": {}}]', "'arguments' without 'call'"),
    ("type.json", '{"turns": [{"say": 3}]}', "'say' must be a string"),
    ("top.json", '"hello"', "expected a list of turns"),
])
def test_a_bad_script_is_one_line(tmp_path: Path, name, text, why):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert message.startswith(str(path)) and why in message and "\n" not in message
    with pytest.raises(BackendOptionError):
        backend_config(script=path)
    with pytest.raises(ScriptError, match="cannot read"):
        load_script(tmp_path / "missing.json")


# --------------------------------------------------------------------------- over the wire


async def test_a_tool_loop_over_the_wire(autojump_clock):
    config = BackendConfig(realtime_factor=1.0, script=SCRIPT)
    async with in_memory(config) as (c, _):
        await c.recv()
        await c.update(tools=[TURN_HEAD])
        for _ in range(2):
            await c.send("response.create")
            events = await c.until("response.done")
        call = events[-1]["response"]["output"][1]
        await c.send("conversation.item.create", item={
            "type": "function_call_output", "call_id": call["call_id"],
            "output": "turned to -90"})
        await c.send("response.create")
        events = await c.until("response.done")
    assert said(events) == "*beep* (tool turn_head said: turned to -90)"
    # The call follows the preamble's audio on the clock, as the service's would.
    call_added = next(e for e in c.events if e["type"] == "response.output_item.added"
                      and e["item"]["type"] == "function_call")
    preamble = [e for e in c.events if e.get("response_id") == call_added["response_id"]
                and e["type"] == "response.output_audio.delta"]
    assert c.time_of(call_added) - c.time_of(preamble[0]) == pytest.approx(1.0)


def sdk_tool_loop(url: str) -> list[Any]:
    """A whole tool loop through the openai SDK's own realtime client (asyncio, in a thread)."""
    from openai import AsyncOpenAI

    async def main() -> list[Any]:
        client = AsyncOpenAI(api_key="sk-sdk", websocket_base_url=url.removesuffix("/realtime"))
        seen: list[Any] = []
        async with client.realtime.connect(model="gpt-realtime") as conn:
            await conn.session.update(session={"type": "realtime", "tools": [TURN_HEAD],
                                               "tool_choice": "auto"})
            await conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Look left."}]})
            await conn.response.create()
            quoted = False
            async for event in conn:
                seen.append(event)
                if event.type == "response.function_call_arguments.done":
                    degrees = json.loads(event.arguments)["degrees"]
                    await conn.conversation.item.create(item={
                        "type": "function_call_output", "call_id": event.call_id,
                        "output": f"turned to {degrees}"})
                elif event.type == "response.done" and not quoted:
                    quoted = True
                    await conn.response.create()
                elif event.type == "response.done":
                    break
        return seen

    return asyncio.run(asyncio.wait_for(main(), 10))


async def test_the_openai_sdk_client_runs_a_tool_loop():
    script = Script((SCRIPT.turns[1],))
    with trio.fail_after(15):
        async with backend(script=script) as url:
            events = await trio.to_thread.run_sync(sdk_tool_loop, url)
    kinds = [e.type for e in events]
    assert kinds.count("response.done") == 2
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.name == "turn_head" and json.loads(done.arguments) == {"degrees": -90}
    final = [e for e in events if e.type == TRANSCRIPT_DONE][-1]
    assert final.transcript == "*beep* (tool turn_head said: turned to -90)"
    assert events[-1].response.status == "completed"
