"""The tool loop of one session, as data (sans-IO).

A call is announced by ``response.output_item.added`` (it gets its place in the conversation
then), its arguments stream in and are final at ``response.function_call_arguments.done``
(recorded then: :class:`StoreToolCall`). It runs only once the response that made it is done
with status ``completed``: ``.done`` is also sent for interrupted responses, and the calls of a
``failed``, ``cancelled`` or ``incomplete`` response are recorded ``rejected`` and never run.

Each output goes back as a ``function_call_output`` item; once every call of the asking
response is answered, one ``response.create`` follows when no response is active and the user
is not speaking (a response the service creates for the user's turn answers them as well);
after ``conversation_already_has_active_response`` it is retried once, when the active one is
done. After ``end_conversation`` the reply to its output is the goodbye: when it is done,
:class:`HangUp`.

The service's ``mcp_approval_request`` items are held the same way (:mod:`.remote_mcp`): run
once their response completed, answered with an ``mcp_approval_response`` after which the
service goes on by itself (no reply is asked for).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.protocol.actions import Action, CallTool, HangUp, Send
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.realtime.client_events import ItemCreateFunctionOutput, ResponseCreate
from r2d2voice.realtime.remote_mcp import RemoteMcp, tool_name
from r2d2voice.realtime.server_events import (
    CallArgumentsDelta,
    CallArgumentsDone,
    McpApprovalRequest,
    McpEvent,
    McpListTools,
    McpListToolsFailed,
)
from r2d2voice.realtime.tracking import remember


class CallState(enum.Enum):
    STREAMING = "streaming"  # arguments still coming
    READY = "ready"  # arguments final; waiting for the response to finish
    RUNNING = "running"  # handed to the shell (CallTool); its output is due
    DONE = "done"  # output sent, or rejected


_UNRUN = (CallState.STREAMING, CallState.READY)


@dataclass
class ToolCall:
    call_id: str
    item_id: str
    response_id: str
    seq: int
    name: str
    parts: list[str] = field(default_factory=list, repr=False)
    arguments: str | None = field(default=None, repr=False)
    state: CallState = CallState.STREAMING
    #: the service's approval request for a remote MCP call, not a function call
    approval: bool = False


class ToolCalls:
    """Every function call this session made, by call id, and the reply the outputs ask for."""

    def __init__(self) -> None:
        self._calls: OrderedDict[str, ToolCall] = OrderedDict()
        self.due = False  # outputs sent: the model should answer them
        self.requested = False  # our response.create awaits its response.created
        self._retried = False
        self._hang_up = False  # end_conversation ran: the next reply we ask for is the goodbye
        self._goodbye: str | None = None
        self.remote = RemoteMcp()

    @property
    def running(self) -> list[str]:
        """Names of the calls whose output is still due."""
        return [c.name for c in self._calls.values() if c.state is CallState.RUNNING]

    @property
    def awaiting_reply(self) -> bool:
        """Outputs were sent and the model's answer to them has not started yet."""
        return self.due or self.requested

    def get(self, call_id: str) -> ToolCall | None:
        return self._calls.get(call_id)

    # -- the calls -----------------------------------------------------------------------
    def added(self, response_id: str, item_id: str, call_id: str, name: str, seq: int) -> None:
        remember(self._calls, call_id, ToolCall(call_id, item_id, response_id, seq, name))

    def delta(self, ev: CallArgumentsDelta) -> None:
        call = self._calls.get(ev.call_id)
        if call is not None and call.state is CallState.STREAMING:
            call.parts.append(ev.delta)

    def arguments_done(self, ev: CallArgumentsDone, seq: int) -> list[Action]:
        """The arguments are final: the call is recorded (``running`` until its result)."""
        call = self._calls.get(ev.call_id)
        if call is None:  # never announced: take it as it comes
            call = ToolCall(ev.call_id, ev.item_id, ev.response_id, seq, ev.name or "?")
            remember(self._calls, ev.call_id, call)
        if call.state is not CallState.STREAMING:
            return []
        call.arguments, call.state = ev.arguments, CallState.READY
        return [StoreToolCall(call.call_id, call.item_id, call.response_id, call.seq,
                              call.name, ev.arguments)]

    def mcp(self, ev: McpEvent, seq: Callable[[str], int],
            active_response: str | None) -> list[Action]:
        """An MCP item of the service (each taken once): a call it made is recorded, an
        approval request held until its response (``active_response`` when the item came
        without one) has completed — at once if there is none."""
        if isinstance(ev, McpListToolsFailed):
            return self.remote.listed(ev)
        if ev.item_id and not self.remote.first(ev.item_id):  # its second copy
            return []
        if isinstance(ev, McpListTools):
            return self.remote.listed(ev)
        if not isinstance(ev, McpApprovalRequest):
            return self.remote.call_done(ev, seq(ev.item_id))
        response_id = ev.response_id or active_response
        call = ToolCall(ev.item_id, ev.item_id, response_id or "", seq(ev.item_id),
                        tool_name(ev.server_label, ev.name), arguments=ev.arguments,
                        state=CallState.READY, approval=True)
        remember(self._calls, call.call_id, call)
        out: list[Action] = [StoreToolCall(call.call_id, call.item_id, response_id, call.seq,
                                           call.name, ev.arguments)]
        if response_id is None:  # no response to wait for
            call.state = CallState.RUNNING
            out.append(CallTool(call.call_id, call.name, ev.arguments, None, call.seq))
        return out

    def answered(self, result: StoreToolResult, *, hang_up: bool, send: bool) -> list[Action]:
        """The shell ran ``result.call_id``: its output goes back (if ``send``: the session is
        still open) and, once the asking response's calls are all answered, a reply is due."""
        call = self._calls.get(result.call_id)
        if call is None or call.state is not CallState.RUNNING:
            return []
        call.state = CallState.DONE
        if not send:
            return []
        if call.approval:  # the service goes on by itself
            return [Send(self.remote.answer(call.call_id, result))]
        self._hang_up |= hang_up
        if not any(c.response_id == call.response_id and c.state is not CallState.DONE
                   and not c.approval for c in self._calls.values()):
            self.due, self._retried = True, False
        return [Send(ItemCreateFunctionOutput(call.call_id, result.output or ""))]

    # -- the reply they ask for ----------------------------------------------------------
    def request(self, active_response: str | None) -> list[Action]:
        """``response.create`` if a reply is due and no response is active."""
        if not self.due or self.requested or active_response is not None:
            return []
        self.due, self.requested = False, True
        return [Send(ResponseCreate())]

    def response_created(self, response_id: str) -> None:
        """Any response created after the outputs were sent answers them (ours, or the one
        the service made for the user's next turn)."""
        if self._hang_up and self.awaiting_reply:
            self._goodbye, self._hang_up = response_id, False
        self.due = self.requested = False

    def response_done(self, response_id: str, status: str,
                      details: dict[str, Any] | None) -> list[Action]:
        """Run the calls of a completed response, reject those of any other; hang up after
        the goodbye (unless the user talked over it: ``cancelled`` calls the hang-up off)."""
        out: list[Action] = []
        for call in self._calls.values():
            if call.response_id != response_id or call.state not in _UNRUN:
                continue
            if status == "completed" and call.state is CallState.READY:
                call.state = CallState.RUNNING
                out.append(CallTool(call.call_id, call.name, call.arguments or "", response_id,
                                    call.seq))
                continue
            if call.state is CallState.STREAMING:  # cut before its arguments were final
                out.append(StoreToolCall(call.call_id, call.item_id, response_id, call.seq,
                                         call.name, "".join(call.parts)))
            call.state = CallState.DONE
            out.append(StoreToolResult(call.call_id, "rejected",
                                       f"not run: the response ended {_why(status, details)}"))
        if self._goodbye == response_id:
            self._goodbye = None
            if status != "cancelled":
                out.append(HangUp())
        return out

    def busy(self) -> None:
        """The service refused our ``response.create``: one is active. Ours goes again (once)
        when that one is done."""
        self.requested = False
        self.due, self._retried = not self._retried, True

    def stop(self) -> None:
        """The session is gone: nothing more is asked of it."""
        self.due = self.requested = self._hang_up = False
        self._goodbye = None


def _why(status: str, details: dict[str, Any] | None) -> str:
    """``failed (rate_limit_exceeded)``, ``cancelled (turn_detected)``, …"""
    details = details or {}
    error = details.get("error")
    reason = details.get("reason") or (error.get("code") if isinstance(error, dict) else None)
    return f"{status} ({reason})" if isinstance(reason, str) and reason else status
