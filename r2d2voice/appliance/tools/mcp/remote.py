"""Remote MCP through the service: a ``remote = true`` server is handed to the Realtime API's
own ``type: "mcp"`` tool. :func:`session_tool` is the server's entry in ``session.update``:
``server_url``, ``allowed_tools`` (the allowlist), ``headers`` and ``require_approval``
(``confirm`` tools always, the others never).

The service's MCP items are the Realtime core's (``realtime/remote_mcp.py``): its calls are
audited there, and each approval request becomes a call of ``<server>__<tool>`` that the
Toolbox answers with the same confirm policy as a local call (:meth:`RemoteMcp.needs_confirm`).
"""

from __future__ import annotations

from typing import Any

from r2d2voice.appliance.tools.mcp.config import SEPARATOR, McpSpec


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
    """The remote servers of a tools file: their session entries, and which of their tools
    need the person's yes (the service's approval requests are decided by that)."""

    def __init__(self, specs: tuple[McpSpec, ...]) -> None:
        self.specs = {s.name: s for s in specs if s.remote}

    def session_tools(self) -> list[dict[str, Any]]:
        return [session_tool(s) for s in self.specs.values()]

    def needs_confirm(self, name: str) -> bool | None:
        """For ``<server>__<tool>`` of a remote server: whether it needs a yes (None: not
        one of ours)."""
        server, _, tool = name.partition(SEPARATOR)
        spec = self.specs.get(server)
        return None if spec is None else tool in spec.confirm
