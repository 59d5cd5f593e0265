"""What a session does about remote MCP servers besides replies (pure functions): it lists the
tools of a server when the session starts offering it, and takes the client's answer to an
approval request only for a request it made."""

from __future__ import annotations

from r2d2voice.localbackend.items import Conversation, Item
from r2d2voice.localbackend.mcp import list_item, servers
from r2d2voice.localbackend.script import Script
from r2d2voice.localbackend.wire import EventMaker, Json, require

__all__ = ["approval_request", "list_new_servers"]


def list_new_servers(ev: EventMaker, conversation: Conversation, before: Json, after: Json,
                     script: Script) -> list[Json]:
    """The ``mcp_list_tools`` of each server ``after`` offers and ``before`` did not: the
    allowlist, or the tools the script calls on it (the backend reaches no server)."""
    known = {t["server_label"] for t in servers(before)}
    out: list[Json] = []
    for server in servers(after):
        label = server["server_label"]
        if label in known:
            continue
        allowed = server.get("allowed_tools")
        names = allowed if isinstance(allowed, list) else sorted(
            {t.mcp.tool for t in script.turns if t.mcp is not None and t.mcp.server == label})
        item_id = ev.new_id("mcpl")
        item = Item(item_id, "mcp_list_tools", list_item(item_id, label, names))
        previous = conversation.insert(item)
        wire = conversation.wire(item)
        out += [ev("mcp_list_tools.in_progress", item_id=item_id),
                ev("conversation.item.added", previous_item_id=previous, item=wire),
                ev("mcp_list_tools.completed", item_id=item_id),
                ev("conversation.item.done", previous_item_id=previous, item=wire)]
    return out


def approval_request(conversation: Conversation, item: Item) -> Item | None:
    """The request an ``mcp_approval_response`` answers (a ClientError if it names none);
    None for any other item."""
    if item.role != "mcp_approval_response":
        return None
    request = conversation.get(item.call_id or "")
    require(request is not None and request.role == "mcp_approval_request",
            f"No MCP approval request found with id {item.call_id}.", "item.approval_request_id")
    return request
