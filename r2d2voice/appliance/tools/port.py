"""The Toolbox as the link sees it: one call in, its audit result out (``__call__``), and what a
connection needs beyond single calls (``link.tools.ToolOffer``): the tools offered now and a
signal when they change, the person's utterances (for confirmation), the service's remote
MCP items, and the answers to its approval requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from r2d2voice.appliance.tools.runner import Toolbox, ToolContext
from r2d2voice.protocol.actions import Action, CallTool
from r2d2voice.protocol.tool_records import StoreToolResult

if TYPE_CHECKING:
    from r2d2voice.link.tools import CallHooks
    from r2d2voice.realtime.client_events import ClientEvent


class ToolboxPort:
    """Adapts a :class:`Toolbox` to the link's ``ToolCaller`` and ``ToolOffer``."""

    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    async def __call__(self, request: CallTool, hooks: CallHooks) -> StoreToolResult:
        result = await self.toolbox.call(
            request.name, request.arguments,
            context=ToolContext(request.call_id, hooks.end_conversation,
                                seq=getattr(request, "seq", None), ask=hooks.ask))
        return StoreToolResult(request.call_id, result.status, result.output,
                               result.exit_code, result.duration_ms)

    @property
    def version(self) -> int:
        return self.toolbox.version

    def session_tools(self) -> tuple[dict[str, Any], ...]:
        return tuple(self.toolbox.session_tools())

    async def changed(self, since: int) -> None:
        await self.toolbox.changed(since)

    def heard(self, text: str, seq: int | None) -> None:
        self.toolbox.heard(text, seq)

    def service_event(self, event: dict[str, Any], seq: Callable[[str], int]) -> list[Action]:
        mcp = self.toolbox.mcp
        return [] if mcp is None or not mcp.remote.specs else mcp.remote.receive(event, seq)

    def answer(self, result: StoreToolResult
               ) -> tuple[ClientEvent, StoreToolResult | None] | None:
        """The ``mcp_approval_response`` for a verdict on the service's approval request (and
        the record to store now), or None for an ordinary call's result."""
        mcp = self.toolbox.mcp
        if mcp is None or not mcp.remote.pending(result.call_id):
            return None
        return mcp.remote.answer(result)
