"""What each reply says or calls: a quote of tool outputs not yet answered, else the next turn
of the script; after an approved remote MCP request, the call and a quote of what the server
answered (pure logic over the conversation)."""

from __future__ import annotations

from dataclasses import dataclass

from r2d2voice.localbackend.items import Conversation, Item
from r2d2voice.localbackend.mcp import McpPlan, mcp_server, needs_approval
from r2d2voice.localbackend.script import Script
from r2d2voice.localbackend.tools import offers_tools, quote_outputs
from r2d2voice.localbackend.wire import Json

__all__ = ["McpStep", "Planner", "ReplyPlan"]


@dataclass(frozen=True)
class McpStep:
    """A remote MCP item of a reply: the service asks first (``ask``), or makes the call
    (after the approval ``approval_request_id``, if there was one)."""

    plan: McpPlan
    ask: bool
    approval_request_id: str | None = None


@dataclass(frozen=True)
class ReplyPlan:
    """A reply: its transcript (None: the beeps' own), a function call (tool name,
    arguments), a remote MCP item."""

    say: str | None = None
    call: tuple[str, str] | None = None
    mcp: McpStep | None = None


def quote_mcp(plan: McpPlan) -> str:
    """The reply about a remote call: ``*beep* (tool SERVER.TOOL said: OUTPUT)``."""
    said = f"error: {plan.error}" if plan.error is not None else plan.output
    return quote_outputs([(f"{plan.server}.{plan.tool}", said)])


class Planner:
    """Per connection: the script turns used and the tool outputs already answered."""

    def __init__(self, script: Script | None) -> None:
        self.script = script or Script()
        self.turns = 0  # script turns used
        self._answered: set[str] = set()  # call_ids whose outputs a reply has quoted

    def next(self, conversation: Conversation, session: Json) -> ReplyPlan:
        """The plan of the reply starting now. A scripted call is made only while the session
        offers tools (``tools`` set, ``tool_choice`` not none); a function's name need not be
        one of them (a model may call a tool it was not given), a remote server must be."""
        outputs = [it for it in conversation.items
                   if it.role == "function_call_output" and it.call_id not in self._answered]
        if outputs:
            quoted = []
            for it in outputs:
                self._answered.add(it.call_id or "")
                call = conversation.call(it.call_id or "")
                quoted.append((call.name if call and call.name else "?", it.text or ""))
            return ReplyPlan(quote_outputs(quoted))
        self.turns += 1
        turn = self.script.turn(self.turns)
        if not offers_tools(session):
            return ReplyPlan(turn.say)
        if turn.mcp is not None:
            server = mcp_server(session, turn.mcp.server, turn.mcp.tool)
            if server is None:
                return ReplyPlan(turn.say)
            if needs_approval(server, turn.mcp.tool):
                return ReplyPlan(turn.say, mcp=McpStep(turn.mcp, ask=True))
            return ReplyPlan(quote_mcp(turn.mcp), mcp=McpStep(turn.mcp, ask=False))
        if turn.call is not None:
            return ReplyPlan(turn.say, (turn.call, turn.arguments))
        return ReplyPlan(turn.say)

    @staticmethod
    def approved(response: Item, request: Item) -> ReplyPlan:
        """The reply the service makes by itself after the client's ``mcp_approval_response``:
        the call and a quote of its output, or (refused) a word about that."""
        assert request.plan is not None
        if not response.wire.get("approve"):
            reason = response.wire.get("reason") or "no reason given"
            return ReplyPlan(f"*beep* (not approved: {reason})")
        return ReplyPlan(quote_mcp(request.plan),
                         mcp=McpStep(request.plan, ask=False, approval_request_id=request.id))
