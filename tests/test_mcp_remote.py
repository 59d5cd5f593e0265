"""Remote MCP through the service (sans-IO): a ``remote = true`` server becomes the Realtime
API's own ``type: "mcp"`` tool; the service's MCP items become audit records and approval
requests, answered by the same confirm policy. Every event sent or received is checked against
the ``openai`` package's schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import TypeAdapter

from r2d2voice.appliance.tools import load_tools
from r2d2voice.appliance.tools.mcp.config import McpSpec
from r2d2voice.appliance.tools.mcp.remote import RemoteMcp, session_tool
from r2d2voice.protocol.actions import CallTool
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime.client_events import ToolsUpdate, to_dict

CLIENT = TypeAdapter(RealtimeClientEvent)
SERVER = TypeAdapter(RealtimeServerEvent)
SHOP = McpSpec("shop", url="https://shop.example/mcp", headers={"Authorization": "Bearer t"},
               tools=("browse", "buy"), confirm=("buy",), remote=True)


def server_event(event: dict[str, Any]) -> dict[str, Any]:
    SERVER.validate_python(event)
    return event


def item_done(item: dict[str, Any], n: int = 1) -> dict[str, Any]:
    return server_event({"type": "response.output_item.done", "event_id": f"ev{n}",
                         "response_id": "r1", "output_index": 0, "item": item})


def seqs() -> Any:
    known: dict[str, int] = {}
    return lambda item_id: known.setdefault(item_id, len(known) + 5)


def test_a_remote_server_is_the_services_mcp_tool(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_text('[[mcp]]\nname = "shop"\nurl = "https://shop.example/mcp"\nremote = true\n'
                    'tools = ["browse", "buy"]\nconfirm = ["buy"]\n'
                    'headers = { Authorization = "Bearer ${SHOP_TOKEN}" }\n')
    box = load_tools(path, variables={"SHOP_TOKEN": "tok"})
    [entry] = box.session_tools()
    assert entry == {"type": "mcp", "server_label": "shop",
                     "server_url": "https://shop.example/mcp",
                     "allowed_tools": ["browse", "buy"],
                     "headers": {"Authorization": "Bearer tok"},
                     "require_approval": {"always": {"tool_names": ["buy"]},
                                          "never": {"tool_names": ["browse"]}}}
    # the tools-only session.update sent when the offer changes, as the service takes it
    CLIENT.validate_python(to_dict(ToolsUpdate((entry,)), "e1"))
    plain = session_tool(McpSpec("kb", url="https://kb.example/mcp", remote=True))
    assert plain["require_approval"] == "never" and "allowed_tools" not in plain
    CLIENT.validate_python(to_dict(ToolsUpdate((plain,)), "e2"))


def test_an_approval_request_is_a_held_call_and_its_yes_approves() -> None:
    remote, seq = RemoteMcp((SHOP,)), seqs()
    request = {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "shop",
               "name": "buy", "arguments": '{"item": "milk"}'}
    out = remote.receive(item_done(request), seq)
    assert out == [StoreToolCall("mcpr_1", "mcpr_1", "r1", 5, "shop__buy", '{"item": "milk"}'),
                   CallTool("mcpr_1", "shop__buy", '{"item": "milk"}', "r1")]
    assert remote.pending("mcpr_1") and remote.needs_confirm("shop__buy") is True
    event, record = remote.answer(StoreToolResult("mcpr_1", "ok", "confirmed"))
    assert record is None  # the row waits for the call's own result
    wire = to_dict(event, "e3")
    CLIENT.validate_python(wire)
    assert wire["item"]["type"] == "mcp_approval_response"
    assert wire["item"]["approval_request_id"] == "mcpr_1" and wire["item"]["approve"] is True
    # the service then calls the tool: its result is the approval's row's
    call = {"type": "mcp_call", "id": "mcp_2", "server_label": "shop", "name": "buy",
            "arguments": '{"item": "milk"}', "approval_request_id": "mcpr_1",
            "output": "ordered 1 milk"}
    assert remote.receive(item_done(call, 2), seq) == [
        StoreToolResult("mcpr_1", "ok", "ordered 1 milk")]


def test_a_refused_approval_is_rejected_with_the_reason() -> None:
    remote = RemoteMcp((SHOP,))
    remote.receive(item_done({"type": "mcp_approval_request", "id": "mcpr_9",
                              "server_label": "shop", "name": "buy", "arguments": "{}"}),
                   seqs())
    refusal = StoreToolResult("mcpr_9", "rejected", "not run: the person said no ('no')")
    event, record = remote.answer(refusal)
    wire = to_dict(event, "e4")
    CLIENT.validate_python(wire)
    assert wire["item"]["approve"] is False and "said no" in wire["item"]["reason"]
    assert record == refusal and not remote.pending("mcpr_9")


@pytest.mark.parametrize(("error", "status", "output"), [
    (None, "ok", "3 kinds of milk"),
    ({"type": "tool_execution_error", "message": "the shop is closed"}, "error",
     "the shop is closed"),
])
def test_the_services_mcp_calls_are_audited(error: Any, status: str, output: str) -> None:
    item: dict[str, Any] = {"type": "mcp_call", "id": "mcp_7", "server_label": "shop",
                            "name": "browse", "arguments": '{"q": "milk"}'}
    item.update({"error": error} if error else {"output": "3 kinds of milk"})
    out = RemoteMcp((SHOP,)).receive(item_done(item), seqs())
    assert out == [StoreToolCall("mcp_7", "mcp_7", "r1", 5, "shop__browse", '{"q": "milk"}'),
                   StoreToolResult("mcp_7", status, output)]


def test_other_events_mean_nothing_to_it() -> None:
    remote = RemoteMcp((SHOP,))
    listed = item_done({"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "shop",
                        "tools": [{"name": "buy", "input_schema": {}}]})
    assert remote.receive(listed, seqs()) == []
    done = server_event({"type": "response.mcp_call.completed", "event_id": "e",
                         "item_id": "mcp_7", "output_index": 0})
    assert remote.receive(done, seqs()) == []
    message = item_done({"type": "message", "id": "m1", "role": "assistant", "content": []})
    assert remote.receive(message, seqs()) == []
    assert json.dumps(remote.session_tools())  # JSON-ready
