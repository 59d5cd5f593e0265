"""Remote MCP on the local backend (sans-IO, every event checked against the openai SDK's
schemas by the Peer): ``type: "mcp"`` session tools checked as the service does, the listing of
a newly offered server, a scripted call the service makes by itself, an approval request and
the reply the service makes once the client answers it (queued behind a reply in progress),
and the script's ``mcp`` key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from localpeer import Peer, first, types

from r2d2voice.localbackend.mcp import McpPlan
from r2d2voice.localbackend.script import Script, ScriptError, ScriptTurn, load_script

BUY = McpPlan("shop", "buy", '{"item": "milk"}', output="ordered 1 milk")
TRANSCRIPT_DONE = "response.output_audio_transcript.done"


def shop(approval: Any = None, **more: Any) -> dict[str, Any]:
    tool = {"type": "mcp", "server_label": "shop", "server_url": "https://shop.example/mcp",
            "allowed_tools": ["browse", "buy"], **more}
    if approval is not None:
        tool["require_approval"] = approval
    return tool


def mcp_peer(*turns: ScriptTurn, tool: dict[str, Any] | None = None) -> tuple[Peer, list]:
    p = Peer(script=Script(turns))
    events = p.send("session.update", session={"type": "realtime", "tools": [tool or shop()]})
    return p, events


def items_done(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["item"] for e in events if e["type"] == "response.output_item.done"]


def approve(p: Peer, request_id: str, yes: bool, reason: str | None = None) -> list:
    item = {"type": "mcp_approval_response", "approval_request_id": request_id,
            "approve": yes, **({"reason": reason} if reason else {})}
    return p.send("conversation.item.create", item=item)


def test_a_newly_offered_server_is_listed_once() -> None:
    p, events = mcp_peer()
    assert types(events) == ["session.updated", "mcp_list_tools.in_progress",
                             "conversation.item.added", "mcp_list_tools.completed",
                             "conversation.item.done"]
    listed = events[-1]["item"]
    assert (listed["type"], listed["server_label"]) == ("mcp_list_tools", "shop")
    assert [t["name"] for t in listed["tools"]] == ["browse", "buy"]
    again = p.send("session.update", session={"type": "realtime", "instructions": "x"})
    assert types(again) == ["session.updated"]


def test_an_approval_request_then_the_call_once_the_client_approves() -> None:
    p, _ = mcp_peer(ScriptTurn(say="Shall I buy milk?", mcp=BUY),
                    tool=shop({"always": {"tool_names": ["buy"]}}))
    p.send("response.create")
    events = p.stream()
    message, request = items_done(events)
    assert message["type"] == "message"
    assert first(events, TRANSCRIPT_DONE)["transcript"] == "Shall I buy milk?"
    assert request == {"id": request["id"], "type": "mcp_approval_request",
                       "server_label": "shop", "name": "buy", "arguments": '{"item": "milk"}'}
    assert events[-1]["response"]["status"] == "completed"
    assert not p.queue  # nothing more until the client answers
    # the client approves: the service goes on by itself with the call and a word on it
    answered = approve(p, request["id"], True)
    assert types(answered) == ["conversation.item.added", "conversation.item.done"]
    events = p.stream()
    order = [t for t in types(events) if not t.startswith("response.output_audio")]
    assert order[:9] == ["response.created", "response.output_item.added",
                         "conversation.item.added", "response.mcp_call_arguments.delta",
                         "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
                         "response.mcp_call.completed", "response.output_item.done",
                         "conversation.item.done"]
    call, said = items_done(events)
    assert call["type"] == "mcp_call" and call["approval_request_id"] == request["id"]
    assert (call["output"], call["error"]) == ("ordered 1 milk", None)
    assert said["type"] == "message"
    assert first(events, TRANSCRIPT_DONE)["transcript"] == \
        "*beep* (tool shop.buy said: ordered 1 milk)"


def test_a_refusal_is_answered_with_its_reason() -> None:
    p, _ = mcp_peer(ScriptTurn(mcp=BUY), tool=shop("always"))
    p.send("response.create")
    [request] = items_done(p.stream())
    approve(p, request["id"], False, "the person said no")
    events = p.stream()
    assert [i["type"] for i in items_done(events)] == ["message"]
    assert first(events, TRANSCRIPT_DONE)["transcript"] == \
        "*beep* (not approved: the person said no)"


def test_without_approval_the_service_calls_and_quotes_in_one_reply() -> None:
    failing = McpPlan("shop", "browse", "{}", error="the shop is closed")
    p, _ = mcp_peer(ScriptTurn(say="unused", mcp=failing), tool=shop("never"))
    p.send("response.create")
    events = p.stream()
    assert "response.mcp_call.failed" in types(events)
    call, said = items_done(events)
    assert call["error"] == {"type": "tool_execution_error", "message": "the shop is closed"}
    assert call["output"] is None and said["type"] == "message"
    assert first(events, TRANSCRIPT_DONE)["transcript"] == \
        "*beep* (tool shop.browse said: error: the shop is closed)"


def test_the_answer_during_a_reply_is_answered_after_it() -> None:
    p, _ = mcp_peer(ScriptTurn(mcp=BUY), ScriptTurn(say="Okay."), tool=shop())
    p.send("response.create")
    [request] = items_done(p.stream())
    p.send("response.create")  # another reply is in progress when the answer comes
    out = approve(p, request["id"], True)
    assert types(out) == ["conversation.item.added", "conversation.item.done"]
    assert len(p.queue) == 2
    assert first(p.stream(), TRANSCRIPT_DONE)["transcript"] == "Okay."
    assert [i["type"] for i in items_done(p.stream())] == ["mcp_call", "message"]
    # the one the service made is done: the client may ask for another
    assert types(p.send("response.create")) == []
    assert len(p.queue) == 1


def test_a_server_the_session_does_not_offer_is_not_called_and_answers_need_a_request() -> None:
    p, _ = mcp_peer(ScriptTurn(say="hi", mcp=McpPlan("home", "unlock")))
    p.send("response.create")
    events = p.stream()
    assert [i["type"] for i in items_done(events)] == ["message"]
    [error] = approve(p, "mcpr_nope", True)
    assert error["type"] == "error"
    assert error["error"]["param"] == "item.approval_request_id"


@pytest.mark.parametrize(("mcp", "problem"), [
    ({"server": "shop"}, "'tool' must be a name"),
    ({"server": "shop", "tool": "buy", "price": 3}, "unknown key 'price'"),
    ({"server": "shop", "tool": "buy", "output": "a", "error": "b"}, "not both"),
    ({"server": "shop", "tool": "buy", "output": 3}, "'output' must be a string"),
    ("shop.buy", "expected a table"),
])
def test_the_scripts_mcp_key_is_checked(tmp_path: Path, mcp: Any, problem: str) -> None:
    path = tmp_path / "script.json"
    path.write_text(json.dumps([{"mcp": mcp}]))
    with pytest.raises(ScriptError, match=problem) as caught:
        load_script(path)
    assert str(caught.value).startswith(f"{path}: turn 1: mcp")


def test_a_toml_script_names_a_remote_call(tmp_path: Path) -> None:
    path = tmp_path / "script.toml"
    path.write_text('[[turn]]\nhear = "buy milk"\n[turn.mcp]\nserver = "shop"\ntool = "buy"\n'
                    'output = "ordered 1 milk"\narguments = { item = "milk" }\n')
    assert load_script(path) == Script((ScriptTurn(hear="buy milk", mcp=BUY),))
    both = tmp_path / "both.json"
    both.write_text(json.dumps([{"call": "x", "mcp": {"server": "shop", "tool": "buy"}}]))
    with pytest.raises(ScriptError, match="one call a reply"):
        load_script(both)
