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

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from r2d2voice.link.moments import Moments
from r2d2voice.protocol.actions import CallTool, Record
from r2d2voice.protocol.tool_records import StoreToolResult

log = logging.getLogger("r2d2voice.link.tools")

CALLS_BOUND = 8
RESULTS_BOUND = 16

#: Runs one call: (the call, "end the conversation after the goodbye") -> its result. It must
#: not raise for the tool's own faults (the Toolbox never does).
ToolCaller = Callable[[CallTool, Callable[[], None]], Awaitable[StoreToolResult]]


async def no_tools(call: CallTool, end_conversation: Callable[[], None]) -> StoreToolResult:
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


class ToolRunner:
    """Starts a task per call; ``records`` (borrowed) takes the results nobody can deliver."""

    def __init__(self, caller: ToolCaller,
                 records: trio.MemorySendChannel[tuple[str, Record]],
                 moments: Moments | None = None) -> None:
        self.caller = caller
        self.records = records
        #: ``tool_started`` / ``tool_finished {name, status}`` go to the event stream
        self.moments = moments or Moments()

    async def run(self, calls: trio.MemoryReceiveChannel[ToolJob],
                  results: trio.MemorySendChannel[ToolDone]) -> None:
        """Until ``calls`` closes and every call has finished (or this is cancelled)."""
        async with calls, results, trio.open_nursery() as nursery:
            async for job in calls:
                nursery.start_soon(self._call, job, results.clone())

    async def _call(self, job: ToolJob, results: trio.MemorySendChannel[ToolDone]) -> None:
        def end_conversation() -> None:
            job.hang_up = True

        async with results:
            result: StoreToolResult | None = None
            delivered = False
            try:
                self.moments.emit("tool_started", name=job.call.name)
                result = await self.caller(job.call, end_conversation)
                self.moments.emit("tool_finished", name=job.call.name, status=result.status)
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
