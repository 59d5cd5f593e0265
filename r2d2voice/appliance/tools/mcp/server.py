"""One MCP server for the whole run: connect (stdio process or streamable HTTP), list its
tools, follow its ``tools/list_changed``, run calls with a timeout that cancels them the MCP
way, and, when it is down or crashes, restart it with backoff while the conversation goes on.

Nothing waits for a server to start: its tools are offered once it is ready (``on_change``),
and a call while it is down is an error the model can act on ("not available right now").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import mcp_types
import trio
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from r2d2voice.appliance.tools import arguments
from r2d2voice.appliance.tools.config import one_line
from r2d2voice.appliance.tools.mcp.config import SEPARATOR, McpSpec
from r2d2voice.appliance.tools.mcp.results import result_text
from r2d2voice.appliance.tools.mcp.stdio import Process, Streams, stdio_transport

log = logging.getLogger("r2d2voice.appliance.tools.mcp")
# the SDK and its HTTP client log every request at INFO: the journal gets their warnings only
for _chatty in ("mcp", "httpx2", "httpcore2"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

State = Literal["starting", "ready", "down"]
#: restart delays: this, doubling up to BACKOFF_MAX; a connection that lived HEALTHY_S resets it
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
HEALTHY_S = 60.0
#: a server has this long to answer ``initialize`` and ``tools/list``
CONNECT_TIMEOUT_S = 30.0
#: an HTTP server is pinged this often (a stdio one's exit is seen at once)
PING_S = 30.0
_NAME_RULE = Draft202012Validator({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"})
CLIENT_INFO = mcp_types.Implementation(name="r2d2voice", version="0.1")


@dataclass(frozen=True)
class McpTool:
    """One tool a server offers, as the model sees it (``name`` is ``<server>__<tool>``)."""

    server: str
    tool: str
    description: str
    schema: dict[str, Any]
    check: Any  # a jsonschema validator of its arguments

    @property
    def name(self) -> str:
        return f"{self.server}{SEPARATOR}{self.tool}"


@dataclass(frozen=True)
class Outcome:
    """How a call ended: ``ok``, ``error`` (isError, a server error, the server down) or
    ``timeout`` (cancelled)."""

    status: Literal["ok", "error", "timeout"]
    output: str


class McpServer:
    """Supervises one ``[[mcp]]`` server (not ``remote``); :meth:`run` in the run's nursery."""

    def __init__(self, spec: McpSpec, on_change: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.on_change = on_change
        self.state: State = "starting"
        self.problem: str | None = None
        self.tools: dict[str, McpTool] = {}  # by the name the model sees
        self.restarts = 0
        #: the running stdio process (None for HTTP, or while down)
        self.process: Process | None = None
        self._session: ClientSession | None = None
        self._over = trio.Event()
        self._relist = trio.Event()
        #: set once the first attempt to connect is over (ready, or failed)
        self.settled = trio.Event()

    # -- the supervisor ---------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff, until cancelled."""
        failures = 0
        while True:
            started = trio.current_time()
            try:
                problem = await self._serve()
            except Exception as exc:  # any failure of the server, its transport or the SDK
                problem = _reason(exc)
                log.debug("mcp server %r failed", self.spec.name, exc_info=True)
            lived = trio.current_time() - started
            failures = 1 if lived >= HEALTHY_S else failures + 1
            delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (failures - 1))
            self._down(problem)
            self.settled.set()
            log.warning("mcp server %r (%s): %s; trying again in %.0f s", self.spec.name,
                        self.spec.where, problem, delay)
            await trio.sleep(delay)
            self.restarts += 1

    async def _serve(self) -> str:
        """One connection; returns why it ended."""
        self._over = trio.Event()
        async with self._transport() as (read, write), ClientSession(
                read, write, message_handler=self._message, client_info=CLIENT_INFO) as session:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await session.initialize()
                await self._list(session)
            self._session, self.state, self.problem = session, "ready", None
            log.info("mcp server %r ready: %d tools (%s)", self.spec.name, len(self.tools),
                     ", ".join(t.tool for t in self.tools.values()) or "none offered")
            self.on_change()
            self.settled.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relister, session)
                if self.spec.url is not None:
                    nursery.start_soon(self._pinger, session)
                await self._over.wait()
                nursery.cancel_scope.cancel()
        return self.problem or "closed the connection"

    def _transport(self) -> AbstractAsyncContextManager[Streams]:
        if self.spec.command is not None:
            return self._stdio()
        return _http(self.spec)

    @asynccontextmanager
    async def _stdio(self) -> AsyncIterator[Streams]:
        async def watch(process: Process) -> None:
            await process.ended.wait()
            self._lost("exited")

        def started(process: Process) -> None:
            self.process = process
            watcher.start_soon(watch, process)

        async with trio.open_nursery() as watcher:
            try:
                async with stdio_transport(self.spec, started) as streams:
                    yield streams
            finally:
                self.process = None
                watcher.cancel_scope.cancel()

    def _down(self, problem: str) -> None:
        had_tools = bool(self.tools) or self.state == "ready"
        self._session, self.state, self.problem = None, "down", problem
        self.tools = {}
        if had_tools:
            self.on_change()

    def _lost(self, problem: str) -> None:
        """The connection is over (process exited, ping or call failed): serve ends."""
        if not self._over.is_set():
            self.problem = problem
            self._over.set()

    async def _message(self, message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._relist.set()
        elif isinstance(message, Exception):
            log.info("mcp server %r: %s", self.spec.name, one_line(message, 160))

    async def _relister(self, session: ClientSession) -> None:
        while True:
            await self._relist.wait()
            self._relist = trio.Event()
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await self._list(session)
            except (MCPError, trio.TooSlowError, anyio.BrokenResourceError,
                    anyio.ClosedResourceError) as exc:
                self._lost(f"could not list its tools again: {_reason(exc)}")
                return
            log.info("mcp server %r changed its tools: now %s", self.spec.name,
                     ", ".join(t.tool for t in self.tools.values()) or "none")
            self.on_change()

    async def _pinger(self, session: ClientSession) -> None:
        while True:
            await trio.sleep(PING_S)
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await session.send_ping()
            except (MCPError, trio.TooSlowError, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError) as exc:
                self._lost(f"stopped answering: {_reason(exc)}")
                return

    async def _list(self, session: ClientSession) -> None:
        listed: list[Any] = []
        cursor: str | None = None
        for _ in range(100):  # pages; a server that never ends its list is cut off
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            listed += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        self.tools = {}
        for tool in listed:
            offered = self._offered(tool)
            if offered is not None:
                self.tools[offered.name] = offered

    def _offered(self, tool: Any) -> McpTool | None:
        spec = self.spec
        if not spec.offers(tool.name):
            return None
        schema = dict(tool.input_schema or {"type": "object"})
        why = None
        if not _NAME_RULE.is_valid(f"{spec.name}{SEPARATOR}{tool.name}"):
            why = "its name does not fit the Realtime API's [A-Za-z0-9_-]{1,64}"
        elif schema.get("type") != "object":
            why = "its input schema is not an object"
        else:
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                why = f"its input schema is invalid: {one_line(exc.message, 100)}"
        if why:
            log.warning("mcp server %r: tool %r not offered: %s", spec.name, tool.name, why)
            return None
        return McpTool(spec.name, tool.name, tool.description or "", schema,
                       arguments.validator(schema))

    # -- calls -------------------------------------------------------------------------------
    async def call(self, tool: McpTool, args: dict[str, Any]) -> Outcome:
        """Call ``tool`` (already validated); past ``timeout_s`` it is cancelled (the SDK sends
        ``notifications/cancelled``). Never raises for the server's faults."""
        session = self._session
        if session is None or self.state != "ready":
            return Outcome("error", self.unavailable())
        timeout = self.spec.timeout_s
        with trio.move_on_after(timeout) as deadline:
            try:
                result = await session.call_tool(tool.tool, args)
            except MCPError as exc:
                if exc.code == mcp_types.CONNECTION_CLOSED:
                    self._lost("closed the connection during a call")
                    return Outcome("error", f"the {self.spec.name} server went away during "
                                            "the call; it is being restarted")
                return Outcome("error", f"the server refused: {one_line(exc.message, 300)}")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._lost(f"failed during a call: {_reason(exc)}")
                return Outcome("error", f"the {self.spec.name} server failed during the call "
                                        f"({_reason(exc)}); it is being restarted")
        if deadline.cancelled_caught:
            return Outcome("timeout", f"timed out after {timeout:g} s and was cancelled")
        text = result_text(result)
        if result.is_error:
            return Outcome("error", text or "the tool reported an error")
        return Outcome("ok", text)

    def unavailable(self) -> str:
        """What the model is told when it calls a tool of this server while it is not ready."""
        why = f" ({self.problem})" if self.problem else " (still starting)"
        return (f"the {self.spec.name} server is not available right now{why}; it is being "
                "restarted: tell the person, or try again in a minute")


def _http(spec: McpSpec) -> AbstractAsyncContextManager[Streams]:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    @asynccontextmanager
    async def connect() -> AsyncIterator[Streams]:
        # the headers hold the token: never logged (httpx logs the URL, not headers)
        client = httpx2.AsyncClient(headers=dict(spec.headers), trust_env=False,
                                    timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=300.0))
        async with client, streamable_http_client(str(spec.url), http_client=client) as (
                read, write):
            yield read, write

    return connect()


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason: the exception's message (never headers: none hold them)."""
    if isinstance(exc, trio.TooSlowError):
        return f"did not answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, MCPError):
        return one_line(exc.message, 160)
    if isinstance(exc, OSError) and exc.strerror:
        return f"could not start: {exc.strerror}"
    inner = getattr(exc, "exceptions", None)  # a group from a nursery or task group
    if inner:
        return _reason(inner[0])
    return one_line(str(exc) or type(exc).__name__, 160)
