"""``ship``: copying this robot's transcripts to the fleet's PostgreSQL server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from r2d2voice.cli.checks import robot_db
from r2d2voice.cli.options import db_option

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@click.option("--to", "url", default=None, metavar="URL",
              help="Fleet server, postgresql://… (default: R2D2_SHIP_URL).")
@db_option
@click.option("--follow", is_flag=True,
              help="Keep shipping new rows until SIGINT/SIGTERM, waiting out a server that "
                   "is down.")
@click.option("--device-id", default=None,
              help="This robot's name in the fleet (default: R2D2_DEVICE_ID, else the hostname).")
@click.pass_obj
def ship(invocation: Invocation, url: str | None, db: str | None, follow: bool,
         device_id: str | None) -> None:
    """Ship sessions, messages, responses, errors and tool calls to the fleet server."""
    settings = invocation.settings(db=db, ship_url=url, device_id=device_id)
    from r2d2voice.errors import UsageError
    from r2d2voice.storage.shipping.command import ship_command

    if not settings.ship_url:
        raise UsageError("ship: say where to: --to postgresql://… or R2D2_SHIP_URL")
    robot_db(settings, "ship", existing=True)
    ship_command(settings.db, settings.ship_url, follow=follow, device_id=settings.device_id)


COMMANDS = (ship,)
