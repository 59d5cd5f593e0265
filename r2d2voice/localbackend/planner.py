"""What each reply says or calls: a quote of tool outputs not yet answered, else the next turn
of the script (pure logic over the conversation)."""

from __future__ import annotations

from r2d2voice.localbackend.items import Conversation
from r2d2voice.localbackend.script import Script
from r2d2voice.localbackend.tools import offers_tools, quote_outputs
from r2d2voice.localbackend.wire import Json

__all__ = ["Planner", "ReplyPlan"]

ReplyPlan = tuple[str | None, tuple[str, str] | None]
"""(transcript or None for the beeps' own, (tool name, arguments) or None)."""


class Planner:
    """Per connection: the script turns used and the tool outputs already answered."""

    def __init__(self, script: Script | None) -> None:
        self.script = script or Script()
        self.turns = 0  # script turns used
        self._answered: set[str] = set()  # call_ids whose outputs a reply has quoted

    def next(self, conversation: Conversation, session: Json) -> ReplyPlan:
        """The plan of the reply starting now. A scripted call is made only while the session
        offers tools (``tools`` set, ``tool_choice`` not none); the name need not be one of
        them (a model may call a tool it was not given)."""
        outputs = [it for it in conversation.items
                   if it.role == "function_call_output" and it.call_id not in self._answered]
        if outputs:
            quoted = []
            for it in outputs:
                self._answered.add(it.call_id or "")
                call = conversation.call(it.call_id or "")
                quoted.append((call.name if call and call.name else "?", it.text or ""))
            return quote_outputs(quoted), None
        self.turns += 1
        turn = self.script.turn(self.turns)
        if turn.call is not None and offers_tools(session):
            return turn.say, (turn.call, turn.arguments)
        return turn.say, None
