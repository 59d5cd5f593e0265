"""A small MCP server written with the SDK, for the tests: run as a real stdio process
(``python mcp_server.py``) or on streamable HTTP on a loopback port (``--http PORTFILE``: the
port it bound is written to PORTFILE; ``--token T``: every request must carry ``Bearer T``).

Every call is appended to ``$MCP_TEST_LOG`` (one JSON line: tool and arguments), so a test can
tell what reached the server; ``$MCP_TEST_LOG`` itself comes through ``[mcp.env]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("test-home")


def _log(tool: str, **arguments: Any) -> None:
    path = os.environ.get("MCP_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": tool, **arguments}) + "\n")


@server.tool()
def set_light(room: str, on: bool, brightness: int = 100) -> str:
    """Switch the light of a room on or off."""
    _log("set_light", room=room, on=on, brightness=brightness)
    return f"the {room} light is {'on' if on else 'off'}"


@server.tool()
def unlock_door(door: str) -> str:
    """Unlock a door of the house."""
    _log("unlock_door", door=door)
    return f"the {door} door is unlocked"


@server.tool()
def broken_bulb() -> str:
    """A light that always fails."""
    _log("broken_bulb")
    raise ToolError("the bulb in the hall is burnt out")


@server.tool()
async def slow(seconds: float) -> str:
    """Take a while."""
    _log("slow", seconds=seconds)
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _log("slow-cancelled")
        raise
    return "slow done"


@server.tool()
def big() -> str:
    """Answer with 40 KiB of text."""
    return "x" * 40 * 1024


@server.tool()
def environment() -> str:
    """The names of the variables in this server's environment."""
    return " ".join(sorted(os.environ))


@server.tool()
def crash() -> str:
    """Die at once, mid-call."""
    _log("crash")
    sys.stdout.flush()
    os._exit(3)


@server.tool()
async def add_scene(ctx: Context) -> str:
    """Add the tool ``scene`` and tell the client that the list changed."""

    @server.tool()
    def scene(name: str) -> str:
        """Start a lighting scene."""
        return f"scene {name} started"

    await ctx.session.send_tool_list_changed()
    return "added"


def _serve_http(port_file: str, token: str | None) -> None:
    import uvicorn
    from starlette.responses import PlainTextResponse

    app = server.streamable_http_app()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and token is not None:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await PlainTextResponse("unauthorized", 401)(scope, receive, send)
                return
        await app(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with open(port_file + ".tmp", "w") as f:
        f.write(str(sock.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    config = uvicorn.Config(guarded, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http")
    parser.add_argument("--token")
    options = parser.parse_args()
    if options.http:
        _serve_http(options.http, options.token)
    else:
        server.run()
