"""Remote MCP through the service (sans-IO): a ``remote = true`` server is handed to the
Realtime API's own ``type: "mcp"`` tool, and the service's MCP items become audit records and
approval requests.

- :func:`session_tool` is the server's entry in ``session.update``: ``server_url``,
  ``allowed_tools`` (the allowlist), ``headers`` and ``require_approval`` (``confirm`` tools
  always, the others never).
- :meth:`RemoteMcp.receive` reads a server event (a dict): an ``mcp_approval_request`` item
  becomes a :class:`CallTool` (named ``<server>__<tool>``, its id the request's) that the tool
  runner answers with the same confirm policy as a local call; an ``mcp_call`` item (done)
  becomes a :class:`StoreToolCall` and :class:`StoreToolResult` — after an approval, the result
  of the approval's row. :meth:`RemoteMcp.answer` turns the runner's verdict into the
  ``mcp_approval_response`` item the service waits for.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

from r2d2voice.appliance.tools.mcp.config import SEPARATOR, McpSpec
from r2d2voice.appliance.tools.mcp.results import cut
from r2d2voice.protocol.actions import Action, CallTool
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime.client_events import ItemCreateMcpApproval

log = logging.getLogger("r2d2voice.appliance.tools.mcp")

APPROVED = "approved by the person"


def session_tool(spec: McpSpec) -> dict[str, Any]:
    """The GA ``session.update`` entry of a remote server."""
    entry: dict[str, Any] = {"type": "mcp", "server_label": spec.name,
                             "server_url": spec.url}
    if spec.tools is not None:
        entry["allowed_tools"] = list(spec.tools)
    if spec.headers:
        entry["headers"] = dict(spec.headers)
    if not spec.confirm:
        entry["require_approval"] = "never"
    else:
        approval: dict[str, Any] = {"always": {"tool_names": list(spec.confirm)}}
        if spec.tools is not None:
            rest = [t for t in spec.tools if t not in spec.confirm]
            if rest:
                approval["never"] = {"tool_names": rest}
        entry["require_approval"] = approval
    return entry


class RemoteMcp:
    """The remote servers of a tools file, and the approvals the service is waiting for."""

    def __init__(self, specs: tuple[McpSpec, ...]) -> None:
        self.specs = {s.name: s for s in specs if s.remote}
        self._pending: dict[str, str] = {}  # approval request id -> name
        self._approved: set[str] = set()
        self._ids = itertools.count(1)

    def session_tools(self) -> list[dict[str, Any]]:
        return [session_tool(s) for s in self.specs.values()]

    def needs_confirm(self, name: str) -> bool | None:
        """For ``<server>__<tool>`` of a remote server: whether it needs a yes (None: not
        one of ours)."""
        server, _, tool = name.partition(SEPARATOR)
        spec = self.specs.get(server)
        return None if spec is None else tool in spec.confirm

    def receive(self, event: dict[str, Any], seq: Callable[[str], int]) -> list[Action]:
        """What a server event means for the audit and the runner (``seq`` places an item in
        the conversation). Events of other kinds: nothing."""
        kind = event.get("type")
        if kind == "mcp_list_tools.failed":
            log.warning("remote mcp: the service could not list the tools of a server "
                        "(item %s)", event.get("item_id"))
            return []
        if kind != "response.output_item.done":
            return []
        item = event.get("item")
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return []
        label, tool = str(item.get("server_label", "?")), str(item.get("name", "?"))
        name = f"{label}{SEPARATOR}{tool}"
        arguments = item.get("arguments") if isinstance(item.get("arguments"), str) else ""
        response_id = event.get("response_id") if isinstance(event.get("response_id"),
                                                             str) else None
        if item.get("type") == "mcp_approval_request":
            self._pending[item["id"]] = name
            return [StoreToolCall(item["id"], item["id"], response_id, seq(item["id"]), name,
                                  arguments),
                    CallTool(item["id"], name, arguments, response_id)]
        if item.get("type") == "mcp_call":
            return self._call_done(item, name, arguments, response_id, seq)
        if item.get("type") == "mcp_list_tools":
            tools = [t.get("name") for t in item.get("tools") or [] if isinstance(t, dict)]
            log.info("remote mcp server %r: the service listed %s", label,
                     ", ".join(map(str, tools)) or "no tools")
        return []

    def _call_done(self, item: dict[str, Any], name: str, arguments: str,
                   response_id: str | None, seq: Callable[[str], int]) -> list[Action]:
        approval = item.get("approval_request_id")
        error = item.get("error")
        if isinstance(error, dict):
            status, output = "error", str(error.get("message") or error.get("type") or "failed")
        else:
            status, output = "ok", str(item.get("output") or "")
        out: list[Action] = []
        if isinstance(approval, str) and approval in self._approved:
            self._approved.discard(approval)
            call_id = approval  # the approval's row gets the result of what it allowed
        else:
            call_id = item["id"]
            out.append(StoreToolCall(call_id, item["id"], response_id, seq(item["id"]), name,
                                     arguments))
        out.append(StoreToolResult(call_id, status, cut(output)))
        return out

    def answer(self, result: StoreToolResult
               ) -> tuple[ItemCreateMcpApproval, StoreToolResult | None]:
        """The ``mcp_approval_response`` item for a runner's verdict on an approval request,
        and the audit record to write now (None once approved: the call's result follows in
        its ``mcp_call`` item). KeyError if ``result`` is not for a pending request."""
        self._pending.pop(result.call_id)
        approve = result.status == "ok"
        item_id = f"r2appr{next(self._ids)}"
        if not approve:
            reason = (result.output or "not approved")[:200]
            return ItemCreateMcpApproval(item_id, result.call_id, False, reason), result
        self._approved.add(result.call_id)
        return ItemCreateMcpApproval(item_id, result.call_id, True), None

    def pending(self, call_id: str) -> bool:
        return call_id in self._pending


def arguments_json(arguments: str) -> str:
    """Arguments as compact JSON for a message (as they came when they are not JSON)."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments
