"""The MCP servers of one run, as the Toolbox sees them: the tools they offer now (a signal
when that changes), a call by its offered name, and the remote servers' session entries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from r2d2voice.appliance.tools.mcp.config import McpSpec, split_name
from r2d2voice.appliance.tools.mcp.remote import RemoteMcp
from r2d2voice.appliance.tools.mcp.server import McpServer, McpTool, Outcome


class McpTools:
    """Every ``[[mcp]]`` server: local ones connected from here, remote ones via the service."""

    def __init__(self, specs: tuple[McpSpec, ...]) -> None:
        self.specs = specs
        self.servers = {s.name: McpServer(s, self._changed) for s in specs if not s.remote}
        self.remote = RemoteMcp(specs)
        #: bumped whenever the tools offered change (a server ready, down, its list changed)
        self.version = 0
        self._event = trio.Event()
        self.running = False
        #: what each server offered when last listed for ``r2d2voice tools``
        self.frozen: dict[str, tuple[str, str | None, dict[str, McpTool]]] = {}

    def _changed(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def changed(self, since: int) -> None:
        """Until the offer differs from version ``since``."""
        while self.version == since:
            await self._event.wait()

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """The local servers, each supervised in a task of its own, for as long as this is
        entered; on the way out their processes are stopped (none outlives it). Entered again
        while running (a conversation of a run that runs them already): nothing more."""
        if self.running:
            yield
            return
        async with trio.open_nursery() as nursery:
            for server in self.servers.values():
                nursery.start_soon(server.run)
            self.running = True
            try:
                yield
            finally:
                self.running = False
                nursery.cancel_scope.cancel()
        for server in self.servers.values():
            server.state, server.tools = "starting", {}

    def offered(self) -> list[McpTool]:
        """The tools of the servers that are ready, in the order of the tools file."""
        return [tool for server in self.servers.values() if server.state == "ready"
                for tool in server.tools.values()]

    def session_tools(self) -> list[dict[str, Any]]:
        local = [{"type": "function", "name": t.name, "description": t.description,
                  "parameters": t.schema} for t in self.offered()]
        return local + self.remote.session_tools()

    def lookup(self, name: str) -> tuple[McpServer, McpTool | None] | None:
        """The server behind ``<server>__<tool>`` and its tool (None while it does not offer
        it: down, or gone from its list); None if ``name`` is no local server's."""
        parts = split_name(name)
        server = self.servers.get(parts[0]) if parts else None
        if server is None:
            return None
        return server, server.tools.get(name)

    def confirm(self, name: str) -> bool:
        """Whether ``<server>__<tool>`` runs only after the person's yes."""
        parts = split_name(name)
        if parts is None:
            return False
        spec = next((s for s in self.specs if s.name == parts[0]), None)
        return spec is not None and parts[1] in spec.confirm

    async def call(self, server: McpServer, tool: McpTool, args: dict[str, Any]) -> Outcome:
        return await server.call(tool, args)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every local server is ready or has failed once, at most ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            for server in self.servers.values():
                await server.settled.wait()
