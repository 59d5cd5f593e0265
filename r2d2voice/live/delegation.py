"""Tools through GPT-Live's Responses delegation, as data (sans-IO).

With function tools configured, ``session.start`` delegates tool work to a hosted Responses
model; its stream comes back wrapped in ``response.event``. A call is final at
``response.output_item.done`` (recorded then: :class:`StoreToolCall`, its ``seq`` the
delegation's place on the timeline) and runs only once its response is ``completed``
(:class:`CallTool`); the calls of a ``failed`` or ``incomplete`` response are recorded
``rejected`` and never run. Each output goes back as ``response.item.create``
(``function_call_output``); once every call of the response is answered, one
``response.create`` lets the delegated response go on, and GPT-Live says the result.
An interruption does not cancel delegated work.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from r2d2voice.live.client_events import FunctionOutput, ResponseCreate
from r2d2voice.live.server_events import BackendCall, BackendResponse, DelegationCreated
from r2d2voice.protocol.actions import Action, CallTool, Send, StoreResponse
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

#: Delegation offsets remembered (the oldest are forgotten).
MAX_OFFSETS = 64


class CallState(enum.Enum):
    READY = "ready"  # arguments final; waiting for its response to complete
    RUNNING = "running"  # handed to the shell (CallTool); its output is due
    DONE = "done"  # output sent, or rejected


@dataclass
class Call:
    call_id: str
    item_id: str
    response_id: str | None
    name: str
    arguments: str = field(repr=False)
    state: CallState = CallState.READY


def tokens(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Responses ``usage`` with the token details the store reads (its text columns)."""
    if not usage:
        return None
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    return {**usage,
            "input_token_details": {"text_tokens": usage.get("input_tokens"),
                                    "cached_tokens": cached},
            "output_token_details": {"text_tokens": usage.get("output_tokens")}}


def _why(ev: BackendResponse) -> str:
    details = ev.details or {}
    error = details.get("error") or details.get("incomplete_details") or {}
    reason = error.get("code") or error.get("reason") if isinstance(error, dict) else None
    return f"{ev.status} ({reason})" if isinstance(reason, str) and reason else ev.status


class Delegations:
    """The delegated responses of one session and the calls they made."""

    def __init__(self) -> None:
        self._calls: OrderedDict[str, Call] = OrderedDict()
        #: delegated responses in progress -> their delegation id
        self._active: OrderedDict[str, str | None] = OrderedDict()
        #: delegation id or response id -> timeline ms where the model delegated
        self._offsets: OrderedDict[str, int] = OrderedDict()

    @property
    def busy(self) -> bool:
        """A delegated response is in progress or a tool's output is still due."""
        return bool(self._active) or any(c.state is not CallState.DONE
                                         for c in self._calls.values())

    def delegated(self, ev: DelegationCreated) -> None:
        for key in filter(None, (ev.delegation_id, ev.response_id)):
            self._offsets[key] = ev.offset_ms
            while len(self._offsets) > MAX_OFFSETS:
                self._offsets.popitem(last=False)

    def response(self, ev: BackendResponse) -> list[Action]:
        """A delegated response started or ended: its calls run if it completed."""
        if ev.status == "in_progress":
            self._active[ev.response_id] = ev.delegation_id
            return [StoreResponse(ev.response_id, "in_progress")]
        self._active.pop(ev.response_id, None)
        out: list[Action] = [StoreResponse(ev.response_id, ev.status, tokens(ev.usage),
                                           ev.details)]
        for call in self._calls.values():
            if call.response_id != ev.response_id or call.state is not CallState.READY:
                continue
            if ev.status == "completed":
                call.state = CallState.RUNNING
                out.append(CallTool(call.call_id, call.name, call.arguments, ev.response_id))
            else:
                call.state = CallState.DONE
                out.append(StoreToolResult(call.call_id, "rejected",
                                           f"not run: the delegated response ended {_why(ev)}"))
        self._forget()
        return out

    def call(self, ev: BackendCall, timeline_ms: int) -> list[Action]:
        """A function call is final: recorded (``running`` until its result)."""
        if ev.call_id in self._calls:
            return []
        response_id = next((r for r, d in reversed(self._active.items())
                            if d == ev.delegation_id or ev.delegation_id is None), None)
        offset = self._offsets.get(ev.delegation_id or "", self._offsets.get(response_id or ""))
        self._calls[ev.call_id] = Call(ev.call_id, ev.item_id, response_id, ev.name,
                                       ev.arguments)
        seq = (timeline_ms if offset is None else offset) + 1
        return [StoreToolCall(ev.call_id, ev.item_id, response_id, seq, ev.name, ev.arguments)]

    def answered(self, result: StoreToolResult, *, send: bool) -> list[Action]:
        """The shell ran ``result.call_id``: its output goes back (if ``send``: the session is
        open), and once its response's calls are all answered, ``response.create``."""
        call = self._calls.get(result.call_id)
        if call is None or call.state is not CallState.RUNNING:
            return []
        call.state = CallState.DONE
        if not send:
            return []
        out: list[Action] = [Send(FunctionOutput(call.call_id, result.output or ""))]
        if not any(c.response_id == call.response_id and c.state is not CallState.DONE
                   for c in self._calls.values()):
            out.append(Send(ResponseCreate()))
        self._forget()
        return out

    def stop(self) -> None:
        """The session is gone: no delegated response goes on."""
        self._active.clear()

    def _forget(self) -> None:
        """Drop the calls of responses that are over and fully answered."""
        for call_id in [c.call_id for c in self._calls.values()
                        if c.state is CallState.DONE and c.response_id not in self._active
                        and not any(o.response_id == c.response_id
                                    and o.state is not CallState.DONE
                                    for o in self._calls.values())]:
            del self._calls[call_id]
