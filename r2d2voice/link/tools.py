"""Runs the model's function calls for the link, each in its own task.

Calls run in the run's nursery, not the connection's: a tool outlives a reconnect (a dome half
way through a turn is not stopped by a network blip). Its result goes back through the results
channel to whichever connection is current; when the session that asked has ended, the result
is recorded for the audit trail but not delivered (its ``call_id`` means nothing to a new
session). Calls still running when the conversation ends (or the run stops) are cancelled: the
tool runner ends their process groups, and they are recorded as stopped.

Channel policies: downlink → runner ``CALLS_BOUND`` calls, the downlink waits when full (the
runner starts every call at once, so it never is; the Toolbox itself limits how many command
tools run at once); runner → link ``RESULTS_BOUND`` results, a finished call waits for the link
(never the downlink).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from r2d2voice.protocol.actions import Action, CallTool, Record
from r2d2voice.protocol.tool_records import StoreToolResult
from r2d2voice.realtime.client_events import ClientEvent

log = logging.getLogger("r2d2voice.link.tools")

CALLS_BOUND = 8
RESULTS_BOUND = 16

@dataclass(frozen=True)
class CallHooks:
    """What a running call may do besides returning its result: end the conversation after the
    goodbye, or tell the model something while it runs (``ask``: a call waiting for the
    person's yes has the model ask for it)."""

    end_conversation: Callable[[], None]
    ask: Callable[[str], Awaitable[None]]


#: Runs one call: (the call, its hooks) -> its result. It must not raise for the tool's own
#: faults (the Toolbox never does).
ToolCaller = Callable[[CallTool, CallHooks], Awaitable[StoreToolResult]]


class ToolOffer(Protocol):
    """The run's tools beyond single calls (``appliance/tools/port.py``): what is offered now
    and when that changes, the person's words, the service's own (remote MCP) tool items."""

    @property
    def version(self) -> int: ...
    def session_tools(self) -> tuple[dict[str, Any], ...]: ...
    async def changed(self, since: int) -> None: ...
    def heard(self, text: str, seq: int | None) -> None: ...
    def service_event(self, event: dict[str, Any],
                      seq: Callable[[str], int]) -> list[Action]: ...
    def answer(self, result: StoreToolResult
               ) -> tuple[ClientEvent, StoreToolResult | None] | None: ...


async def no_tools(call: CallTool, hooks: CallHooks) -> StoreToolResult:
    """The caller when no tools are configured: every call is rejected, nothing runs."""
    await trio.lowlevel.checkpoint()
    return StoreToolResult(call.call_id, "rejected",
                           f"tool {call.name!r} does not exist (available: none)")


@dataclass
class ToolJob:
    """One call on its way: which session asked (``epoch`` names its connection)."""

    call: CallTool
    session_id: str
    epoch: int
    #: the tool asked to end the conversation (``end_conversation``)
    hang_up: bool = False


@dataclass(frozen=True)
class ToolDone:
    job: ToolJob
    result: StoreToolResult


@dataclass(frozen=True)
class ToolPrompt:
    """A running call has something to tell the model (``CallHooks.ask``)."""

    job: ToolJob
    text: str


class ToolRunner:
    """Starts a task per call; ``records`` (borrowed) takes the results nobody can deliver."""

    def __init__(self, caller: ToolCaller,
                 records: trio.MemorySendChannel[tuple[str, Record]]) -> None:
        self.caller = caller
        self.records = records

    async def run(self, calls: trio.MemoryReceiveChannel[ToolJob],
                  results: trio.MemorySendChannel[ToolDone | ToolPrompt]) -> None:
        """Until ``calls`` closes and every call has finished (or this is cancelled)."""
        async with calls, results, trio.open_nursery() as nursery:
            async for job in calls:
                nursery.start_soon(self._call, job, results.clone())

    async def _call(self, job: ToolJob,
                    results: trio.MemorySendChannel[ToolDone | ToolPrompt]) -> None:
        def end_conversation() -> None:
            job.hang_up = True

        async def ask(text: str) -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # the link is gone: no one asks
                await results.send(ToolPrompt(job, text))

        async with results:
            result: StoreToolResult | None = None
            delivered = False
            try:
                result = await self.caller(job.call, CallHooks(end_conversation, ask))
                await results.send(ToolDone(job, result))
                delivered = True
            except trio.BrokenResourceError:  # the link is gone
                pass
            finally:
                if not delivered:  # cancelled (the conversation ended) or nowhere to go
                    self._undelivered(job, result or StoreToolResult(
                        job.call.call_id, "error",
                        "stopped before it finished: the conversation ended"))

    def _undelivered(self, job: ToolJob, result: StoreToolResult) -> None:
        log.warning("tool %s (call %s) %s: its output was not delivered", job.call.name,
                    job.call.call_id, result.status)
        try:
            self.records.send_nowait((job.session_id, result))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.error("tool %s (call %s): its result could not be recorded", job.call.name,
                      job.call.call_id)
