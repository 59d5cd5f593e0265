"""``events``: follow the running appliance's event stream, one JSON object a line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@click.argument("names", nargs=-1, metavar="[EVENT]...")
@click.option("--level", is_flag=True,
              help="Also the speaker's level, about 20 a second while the robot speaks.")
@click.pass_obj
def events(invocation: Invocation, names: tuple[str, ...], level: bool) -> None:
    """Print the running `r2d2voice run` (or `replay`) events as JSON lines until it stops.

    EVENT names the events to follow (default: all but `level`); see docs/body.md."""
    invocation.settings()
    from r2d2voice.system.events import NAMES

    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise click.BadParameter(f"unknown event {unknown[0]!r} (known: {', '.join(NAMES)})",
                                 param_hint="EVENT")
    from r2d2voice.system.event_socket import follow_events

    follow_events(names, level=level)


COMMANDS = (events,)
