"""Runs the model's function calls for the link, each in its own task.

Calls run in the run's nursery, not the connection's: a tool outlives a reconnect (a dome half
way through a turn is not stopped by a network blip). Its result goes back through the results
channel to whichever connection is current; when the session that asked has ended, the result
is recorded for the audit trail but not delivered (its ``call_id`` means nothing to a new
session). Calls still running when the conversation ends (or the run stops) are cancelled: the
tool runner ends their process groups, and they are recorded as stopped.

The results channel carries, besides finished calls (:class:`ToolDone`), what a running call
has the model told (:class:`ToolPrompt`: a call waiting for the person's yes has the model ask)
and the tools on offer whenever they change (:class:`ToolsOffered`: an MCP server came, went
or changed its list; the runner watches the run's :class:`ToolOffer`).

Channel policies: downlink → runner ``CALLS_BOUND`` calls, the downlink waits when full (the
runner starts every call at once, so it never is; the Toolbox itself limits how many command
tools run at once); runner → link ``RESULTS_BOUND`` results, a finished call (a prompt, an
offer) waits for the link (never the downlink).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from r2d2voice.link.moments import Moments
from r2d2voice.protocol.actions import CallTool, Record
from r2d2voice.protocol.tool_records import StoreToolResult

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
    and when that changes (MCP servers come and go), and the person's words (a call waiting
    for a yes is answered by them)."""

    @property
    def version(self) -> int:
        """Changes whenever :meth:`session_tools` would."""

    def session_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools of a session starting now."""

    async def changed(self, since: int) -> None:
        """Until :attr:`version` differs from ``since``."""

    def heard(self, text: str, seq: int | None) -> None:
        """The person said ``text`` (a final transcript, item ``seq`` of the session)."""


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


@dataclass(frozen=True)
class ToolsOffered:
    """The tools on offer changed: these are offered from now on."""

    tools: tuple[dict[str, Any], ...]


#: what the runner hands the link
ToolNews = ToolDone | ToolPrompt | ToolsOffered


class ToolRunner:
    """Starts a task per call; ``records`` (borrowed) takes the results nobody can deliver
    (``observe`` sees them first, as it sees every record)."""

    def __init__(self, caller: ToolCaller,
                 records: trio.MemorySendChannel[tuple[str, Record]],
                 offer: ToolOffer | None = None,
                 observe: Callable[[Record], None] = lambda _: None,
                 moments: Moments | None = None) -> None:
        self.caller = caller
        self.records = records
        self.offer = offer
        self.observe = observe
        #: ``tool_started`` / ``tool_finished {name, status}`` go to the event stream
        self.moments = moments or Moments()

    async def run(self, calls: trio.MemoryReceiveChannel[ToolJob],
                  results: trio.MemorySendChannel[ToolNews]) -> None:
        """Until ``calls`` closes and every call has finished (or this is cancelled); the
        offer is watched meanwhile."""
        async with calls, results, trio.open_nursery() as nursery:
            watching = trio.CancelScope()
            if self.offer is not None:
                nursery.start_soon(self._watch, self.offer, results.clone(), watching)
            async for job in calls:
                nursery.start_soon(self._call, job, results.clone())
            watching.cancel()

    @staticmethod
    async def _watch(offer: ToolOffer, results: trio.MemorySendChannel[ToolNews],
                     scope: trio.CancelScope) -> None:
        """A :class:`ToolsOffered` each time the offer changes."""
        async with results:
            with scope:
                version = offer.version
                while True:
                    await offer.changed(version)
                    version = offer.version
                    try:
                        await results.send(ToolsOffered(offer.session_tools()))
                    except trio.BrokenResourceError:  # the link is gone
                        return

    async def _call(self, job: ToolJob, results: trio.MemorySendChannel[ToolNews]) -> None:
        def end_conversation() -> None:
            job.hang_up = True

        async def ask(text: str) -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # the link is gone: no one asks
                await results.send(ToolPrompt(job, text))

        async with results:
            result: StoreToolResult | None = None
            delivered = False
            try:
                self.moments.emit("tool_started", name=job.call.name)
                result = await self.caller(job.call, CallHooks(end_conversation, ask))
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
        self.observe(result)
        try:
            self.records.send_nowait((job.session_id, result))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.error("tool %s (call %s): its result could not be recorded", job.call.name,
                      job.call.call_id)
