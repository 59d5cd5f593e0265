"""Remote MCP through the service, in the sans-IO Realtime core: a ``remote = true`` server
becomes the Realtime API's own ``type: "mcp"`` tool; the service's MCP items (raw messages, as
``Conversation.receive`` takes them) become audit records, and its approval requests calls the
runner decides with the same confirm policy, answered with an ``mcp_approval_response``. Every
event received or sent is checked against the ``openai`` package's schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import TypeAdapter

from r2d2voice.appliance.tools import load_tools
from r2d2voice.appliance.tools.mcp.config import McpSpec
from r2d2voice.appliance.tools.mcp.remote import RemoteMcp, session_tool
from r2d2voice.protocol import actions as a
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime.client_events import to_dict
from r2d2voice.realtime.conversation import Conversation, Turn

CLIENT = TypeAdapter(RealtimeClientEvent)
SERVER = TypeAdapter(RealtimeServerEvent)
SHOP = McpSpec("shop", url="https://shop.example/mcp", headers={"Authorization": "Bearer t"},
               tools=("browse", "buy"), confirm=("buy",), remote=True)
BUY = {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "shop", "name": "buy",
       "arguments": '{"item": "milk"}'}


def server(type_: str, **body: Any) -> str:
    """A server message, valid for the openai schemas."""
    event = {"type": type_, "event_id": f"ev_{type_}", **body}
    SERVER.validate_python(event)
    return json.dumps(event)


def item_done(item: dict[str, Any], resp: str = "r1") -> list[str]:
    """An output item finished, as the service says it: in the response and the conversation."""
    return [server("response.output_item.done", response_id=resp, output_index=0, item=item),
            server("conversation.item.done", previous_item_id=None, item=item)]


def response(resp: str, *items: dict[str, Any], status: str = "completed") -> list[str]:
    out = [server("response.created", response={"id": resp, "object": "realtime.response",
                                                 "status": "in_progress", "output": []})]
    for item in items:
        out.append(server("response.output_item.added", response_id=resp, output_index=0,
                          item=item))
        out += item_done(item, resp)
    out.append(server("response.done", response={"id": resp, "object": "realtime.response",
                                                 "status": status, "output": list(items)}))
    return out


def feed(conv: Conversation, messages: list[str]) -> list[a.Action]:
    out: list[a.Action] = []
    for message in messages:
        out += conv.receive(message, 1000.0)
    return out


def sent(out: list[a.Action]) -> list[dict[str, Any]]:
    """The client events among ``out`` on the wire, each checked against the schema."""
    wire = [to_dict(x.event, "e1") for x in out if isinstance(x, a.Send)]
    for event in wire:
        CLIENT.validate_python(event)
    return wire


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
    assert RemoteMcp((SHOP,)).needs_confirm("shop__buy") is True
    assert RemoteMcp((SHOP,)).needs_confirm("shop__browse") is False
    assert RemoteMcp((SHOP,)).needs_confirm("home__buy") is None
    plain = session_tool(McpSpec("kb", url="https://kb.example/mcp", remote=True))
    assert plain["require_approval"] == "never" and "allowed_tools" not in plain
    # a change of the offer mid-session is a tools-only session.update the service takes
    conv = Conversation()
    assert sent(conv.tools_offered((entry, plain))) == [
        {"type": "session.update", "event_id": "e1",
         "session": {"type": "realtime", "tools": [entry, plain], "tool_choice": "auto"}}]
    assert conv.config.tools == (entry, plain)  # and what a reconnect would offer


def test_an_approval_request_is_a_held_call_and_its_yes_approves() -> None:
    conv = Conversation()
    out = feed(conv, response("r1", BUY)[:-1])
    # recorded once (it came twice), not run before its response completed
    assert [x for x in out if isinstance(x, StoreToolCall)] == [
        StoreToolCall("mcpr_1", "mcpr_1", "r1", 1, "shop__buy", '{"item": "milk"}')]
    assert not any(isinstance(x, a.CallTool) for x in out)
    out = feed(conv, response("r1", BUY)[-1:])
    assert a.CallTool("mcpr_1", "shop__buy", '{"item": "milk"}', "r1", 1) in out
    assert conv.turn is Turn.ACTING and conv.status(False) == "acting (shop__buy)"
    assert not conv.settled  # the link does not close while the person is asked
    # the appliance has the model ask: a system note and a reply asked for
    asked = sent(conv.tool_says("Ask whether to buy milk."))
    assert [e["type"] for e in asked] == ["conversation.item.create", "response.create"]
    feed(conv, response("r2", {"type": "message", "id": "m2", "role": "assistant",
                               "content": []}))
    # the person said yes: the approval goes back; the row waits for the service's call
    out = conv.tool_finished(StoreToolResult("mcpr_1", "ok", "confirmed: 'yes'"), hang_up=False)
    [approval] = sent(out)
    assert approval["item"]["type"] == "mcp_approval_response"
    assert approval["item"]["approval_request_id"] == "mcpr_1"
    assert approval["item"]["approve"] is True
    assert not any(isinstance(x, StoreToolResult) for x in out)  # the call's result is due
    assert conv.settled  # the service goes on by itself: no reply asked for
    call = {"type": "mcp_call", "id": "mcp_2", "server_label": "shop", "name": "buy",
            "arguments": '{"item": "milk"}', "approval_request_id": "mcpr_1",
            "output": "ordered 1 milk"}
    out = feed(conv, response("r3", call))
    assert [x for x in out if isinstance(x, (StoreToolCall, StoreToolResult))] == [
        StoreToolResult("mcpr_1", "ok", "ordered 1 milk")]


def test_a_refused_approval_is_rejected_with_the_reason() -> None:
    conv = Conversation()
    feed(conv, response("r1", {**BUY, "id": "mcpr_9", "arguments": "{}"}))
    refusal = StoreToolResult("mcpr_9", "rejected", "not run: the person said no ('no')")
    out = conv.tool_finished(refusal, hang_up=False)
    [answer] = sent(out)
    assert answer["item"]["approve"] is False and "said no" in answer["item"]["reason"]
    assert refusal in out and conv.settled


def test_an_approval_of_a_cut_response_is_never_asked_and_a_lost_one_is_an_error() -> None:
    conv = Conversation()
    out = feed(conv, response("r1", BUY, status="cancelled"))
    assert not any(isinstance(x, a.CallTool) for x in out)
    assert StoreToolResult("mcpr_1", "rejected",
                           "not run: the response ended cancelled") in out
    # approved, but the session ends before the service calls it: the row says so
    conv = Conversation()
    feed(conv, response("r1", BUY))
    conv.tool_finished(StoreToolResult("mcpr_1", "ok", "confirmed"), hang_up=False)
    lost = conv.connection_lost(1006, "gone")
    [row] = [x for x in lost if isinstance(x, StoreToolResult)]
    assert row.call_id == "mcpr_1" and row.status == "error" and "session ended" in row.output


def test_the_services_own_calls_are_audited_once() -> None:
    conv = Conversation()
    ok = {"type": "mcp_call", "id": "mcp_7", "server_label": "shop", "name": "browse",
          "arguments": '{"q": "milk"}', "output": "3 kinds of milk"}
    failed = {"type": "mcp_call", "id": "mcp_8", "server_label": "shop", "name": "browse",
              "arguments": "{}", "error": {"type": "tool_execution_error",
                                           "message": "the shop is closed"}}
    out = feed(conv, response("r1", ok, failed))
    assert [x for x in out if isinstance(x, (StoreToolCall, StoreToolResult))] == [
        StoreToolCall("mcp_7", "mcp_7", "r1", 1, "shop__browse", '{"q": "milk"}'),
        StoreToolResult("mcp_7", "ok", "3 kinds of milk"),
        StoreToolCall("mcp_8", "mcp_8", "r1", 2, "shop__browse", "{}"),
        StoreToolResult("mcp_8", "error", "the shop is closed")]
    assert not any(isinstance(x, a.CallTool) for x in out) and conv.settled


def test_listing_is_a_log_line_and_its_failure_a_service_error() -> None:
    conv = Conversation()
    listed = {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "shop",
              "tools": [{"name": "buy", "input_schema": {}}]}
    out = feed(conv, item_done(listed))
    assert out == [a.Notice("remote MCP server 'shop': the service found buy")]
    out = feed(conv, [server("mcp_list_tools.failed", item_id="mcpl_2")])
    [error] = out
    assert isinstance(error, a.StoreError) and error.type == "mcp_list_tools_failed"
    assert not error.fatal
    # the progress events mean nothing more
    assert feed(conv, [server("response.mcp_call.completed", item_id="mcp_7",
                              output_index=0)]) == []
    assert conv.junk_messages == 0


def test_a_running_calls_note_and_the_offer_go_nowhere_once_the_session_is_closed() -> None:
    conv = Conversation()
    conv.connection_lost(1000, "bye")
    assert conv.tool_says("ask") == [] and conv.tools_offered(()) == []
