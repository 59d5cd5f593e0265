"""Remote MCP as the service does it, scripted (pure functions): ``type: "mcp"`` session tools
checked as the service checks them, and the items a scripted MCP call makes — an
``mcp_list_tools`` when a server is offered, an ``mcp_approval_request`` when the session's
``require_approval`` says so, and the ``mcp_call`` with the script's output or error. The
backend reaches no server: the script says what the server answered (``McpPlan``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from r2d2voice.localbackend.wire import Json, require

__all__ = ["McpPlan", "approval_item", "call_item", "check_mcp_tool", "list_item",
           "mcp_server", "needs_approval", "servers"]

_LABEL = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: the keys of a GA ``type: "mcp"`` session tool
_KEYS = {"type", "server_label", "server_url", "connector_id", "tunnel_id", "allowed_tools",
         "allowed_callers", "authorization", "defer_loading", "headers", "require_approval",
         "server_description"}
_APPROVALS = ("always", "never")


@dataclass(frozen=True)
class McpPlan:
    """A scripted call of a remote server's tool, and what the server answered."""

    server: str
    tool: str
    arguments: str = "{}"
    output: str = ""
    #: the server's error message instead of an output (None: it answered)
    error: str | None = None


def check_mcp_tool(tool: Json, p: str) -> Json:
    """A copy of one ``type: "mcp"`` entry of ``session.tools``, or a ClientError."""
    for key in tool:
        require(key in _KEYS, f"Unknown parameter: '{p}.{key}'.", f"{p}.{key}",
                "unknown_parameter")
    label = tool.get("server_label")
    require(isinstance(label, str), f"Missing required parameter: '{p}.server_label'.",
            f"{p}.server_label", "missing_required_parameter")
    require(bool(_LABEL.match(label)), f"Invalid '{p}.server_label': string does not match "
            "pattern '^[a-zA-Z0-9_-]{1,64}$'.", f"{p}.server_label")
    require(any(isinstance(tool.get(k), str) for k in ("server_url", "connector_id",
                                                      "tunnel_id")),
            f"Missing required parameter: one of '{p}.server_url', '{p}.connector_id' or "
            f"'{p}.tunnel_id' must be provided.", f"{p}.server_url",
            "missing_required_parameter")
    headers = tool.get("headers")
    require(headers is None or (isinstance(headers, dict)
                                and all(isinstance(v, str) for v in headers.values())),
            f"Invalid type for '{p}.headers': expected an object of strings.", f"{p}.headers")
    allowed = tool.get("allowed_tools")
    require(allowed is None or _names(allowed) is not None,
            f"Invalid '{p}.allowed_tools': expected an array of tool names or "
            "{'tool_names': [...]}.", f"{p}.allowed_tools")
    approval = tool.get("require_approval")
    require(approval is None or approval in _APPROVALS or (
        isinstance(approval, dict) and set(approval) <= set(_APPROVALS)
        and all(_names(v) is not None for v in approval.values())),
        f"Invalid '{p}.require_approval': expected 'always', 'never' or "
        "{'always': {'tool_names': [...]}, 'never': {...}}.", f"{p}.require_approval")
    return copy.deepcopy(tool)


def _names(value: Any) -> list[str] | None:
    """Tool names of ``[...]`` or ``{"tool_names": [...]}`` (None: neither)."""
    if isinstance(value, dict):
        value = value.get("tool_names", [])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def servers(session: Json) -> list[Json]:
    """The session's MCP tools."""
    return [t for t in session.get("tools") or [] if t.get("type") == "mcp"]


def mcp_server(session: Json, label: str, tool: str) -> Json | None:
    """The session's MCP tool labelled ``label`` if it offers ``tool`` (None: it does not)."""
    for server in servers(session):
        if server["server_label"] != label:
            continue
        allowed = server.get("allowed_tools")
        if allowed is None or tool in (_names(allowed) or []):
            return server
    return None


def needs_approval(server: Json, tool: str) -> bool:
    """Whether the service asks before calling ``tool`` (as the API: unless told otherwise,
    it asks)."""
    approval = server.get("require_approval")
    if approval is None or approval in _APPROVALS:
        return approval != "never"
    if tool in (_names(approval.get("never", [])) or []):
        return False
    always = approval.get("always")
    return always is None or tool in (_names(always) or [])


def approval_item(item_id: str, plan: McpPlan) -> Json:
    return {"id": item_id, "type": "mcp_approval_request", "server_label": plan.server,
            "name": plan.tool, "arguments": plan.arguments}


def call_item(item_id: str, plan: McpPlan, approval_request_id: str | None,
              done: bool) -> Json:
    """An ``mcp_call`` item: in progress, or done with the output or the error."""
    item: Json = {"id": item_id, "type": "mcp_call", "server_label": plan.server,
                  "name": plan.tool, "arguments": plan.arguments,
                  "approval_request_id": approval_request_id, "output": None, "error": None}
    if done and plan.error is not None:
        item["error"] = {"type": "tool_execution_error", "message": plan.error}
    elif done:
        item["output"] = plan.output
    return item


def list_item(item_id: str, label: str, tools: list[str]) -> Json:
    return {"id": item_id, "type": "mcp_list_tools", "server_label": label,
            "tools": [{"name": name, "input_schema": {"type": "object"}} for name in tools]}
