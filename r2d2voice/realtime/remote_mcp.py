"""The service's own MCP calls (remote servers, ``type: "mcp"`` session tools), as data.

The service lists a remote server's tools and calls them itself; what it did comes as items
(``response.output_item.done`` and ``conversation.item.done``, the same item in both — each
is taken once):

- an ``mcp_call`` is recorded for the audit as it is (:class:`StoreToolCall` and its
  :class:`StoreToolResult`: ``ok`` with the output, ``error`` with the error's message);
- an ``mcp_approval_request`` is a call the appliance decides: :class:`ToolCalls` holds it
  like a function call (named ``<server>__<tool>``, run once its response completed) and the
  runner's verdict goes back as an ``mcp_approval_response`` (approve: status ``ok``; the
  service goes on by itself, nothing else is asked). After a yes the row waits for the
  ``mcp_call`` that follows, whose result it gets; one that never comes (the session ended)
  is an ``error``;
- an ``mcp_list_tools`` is a log line, ``mcp_list_tools.failed`` a service error.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from r2d2voice.protocol.actions import Action, Notice, StoreError
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime.client_events import ItemCreateMcpApproval
from r2d2voice.realtime.server_events import McpCall, McpListTools, McpListToolsFailed
from r2d2voice.realtime.tracking import remember

#: between a server's name and its tool's in the names the appliance gives MCP tools
SEPARATOR = "__"
#: a refusal's reason, as the service is told it, at most this long
REASON_CHARS = 200


def tool_name(server_label: str, name: str) -> str:
    """``<server>__<tool>``: the name a remote server's tool has in the audit and the runner."""
    return f"{server_label}{SEPARATOR}{name}"


class RemoteMcp:
    """The MCP items of one session: which were taken, which approvals wait for their call."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, bool] = OrderedDict()
        self._approved: OrderedDict[str, bool] = OrderedDict()
        self._ids = itertools.count(1)

    def first(self, item_id: str) -> bool:
        """True the first time item ``item_id`` is seen."""
        if item_id in self._seen:
            return False
        remember(self._seen, item_id, True)
        return True

    def call_done(self, ev: McpCall, seq: int) -> list[Action]:
        """The audit of a call the service made: after an approval, the approval's row."""
        status, output = ("error", ev.error) if ev.error is not None else ("ok", ev.output)
        approval = ev.approval_request_id
        if approval is not None and self._approved.pop(approval, None):
            return [StoreToolResult(approval, status, output or "")]
        return [StoreToolCall(ev.item_id, ev.item_id, ev.response_id, seq,
                              tool_name(ev.server_label, ev.name), ev.arguments),
                StoreToolResult(ev.item_id, status, output or "")]

    def answer(self, request_id: str, result: StoreToolResult) -> ItemCreateMcpApproval:
        """The ``mcp_approval_response`` for the runner's verdict on ``request_id``."""
        item_id = f"r2appr{next(self._ids)}"
        if result.status != "ok":
            reason = (result.output or "not approved")[:REASON_CHARS]
            return ItemCreateMcpApproval(item_id, request_id, False, reason)
        remember(self._approved, request_id, True)
        return ItemCreateMcpApproval(item_id, request_id, True)

    def waits_for_call(self, call_id: str) -> bool:
        """An approved request whose call the service has still to make."""
        return call_id in self._approved

    def unanswered(self) -> list[Action]:
        """The session is gone: approved requests whose call never came."""
        out: list[Action] = [StoreToolResult(call_id, "error", "approved by the person, but the "
                                             "session ended before the service called it")
                             for call_id in self._approved]
        self._approved.clear()
        return out

    @staticmethod
    def listed(ev: McpListTools | McpListToolsFailed) -> list[Action]:
        if isinstance(ev, McpListToolsFailed):
            return [StoreError("mcp_list_tools_failed", None, "the Realtime service could not "
                               f"list the tools of a remote MCP server (item {ev.item_id})",
                               False)]
        return [Notice(f"remote MCP server {ev.server_label!r}: the service found "
                       + (", ".join(ev.tools) or "no tools"))]
