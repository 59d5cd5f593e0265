"""``devices``: the sound cards PortAudio sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@click.pass_obj
def devices(invocation: Invocation) -> None:
    """List audio inputs and outputs (index, name, channels, default rate; * = default)."""
    invocation.settings()
    from r2d2voice.audio.devices import devices_command

    devices_command()


COMMANDS = (devices,)
