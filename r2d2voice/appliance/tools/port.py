"""The Toolbox as the link sees it: one call in, its audit result out (``__call__``, a
``link.tools.ToolCaller``), and what the run offers beyond single calls (``link.tools.ToolOffer``):
the tools on offer now and a signal when they change, and the person's utterances (a call
waiting for a yes is answered by them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from r2d2voice.appliance.tools.runner import Toolbox, ToolContext
from r2d2voice.protocol.actions import CallTool
from r2d2voice.protocol.tool_records import StoreToolResult

if TYPE_CHECKING:
    from r2d2voice.link.tools import CallHooks


class ToolboxPort:
    """Adapts a :class:`Toolbox` to the link's ``ToolCaller`` and ``ToolOffer``."""

    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    async def __call__(self, request: CallTool, hooks: CallHooks) -> StoreToolResult:
        result = await self.toolbox.call(
            request.name, request.arguments,
            context=ToolContext(request.call_id, hooks.end_conversation, seq=request.seq,
                                ask=hooks.ask))
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
