"""``tools``: the function tools a tools file offers the model, or just a check of it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from r2d2voice.cli.options import tools_option

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@tools_option
@click.option("--check", is_flag=True,
              help="Only validate the file (connecting to no MCP server): print 'ok: N tools'.")
@click.pass_obj
def tools(invocation: Invocation, tools: str | None, check: bool) -> None:
    """List the tools of the tools file (R2D2_TOOLS or --tools) with their arguments; MCP
    servers are connected to briefly to list theirs."""
    settings = invocation.settings(tools=tools)
    from r2d2voice.errors import UsageError

    if not settings.tools:
        raise UsageError("tools: no tools file: give --tools PATH or set R2D2_TOOLS")
    from r2d2voice.appliance.tools.describe import tools_command
    from r2d2voice.appliance.tools.mcp.config import variables

    tools_command(settings.tools, check, sys.stdout, variables(settings.env_file))


COMMANDS = (tools,)
