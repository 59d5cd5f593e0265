"""``devices``: the sound cards PortAudio sees, and how loud the speaker is at the mic."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@click.option("--echo-test", is_flag=True,
              help="Play a chirp on the speaker, record the microphone and a voice: the delay, "
                   "the echo against a voice, what the canceller removes, and a verdict.")
@click.option("--input-device", default=None, help="Microphone (index or name; R2D2_INPUT_DEVICE).")
@click.option("--output-device", default=None, help="Speaker (index or name; R2D2_OUTPUT_DEVICE).")
@click.pass_obj
def devices(invocation: Invocation, echo_test: bool, input_device: str | None,
            output_device: str | None) -> None:
    """List audio inputs and outputs (index, name, channels, default rate; * = default)."""
    settings = invocation.settings(input_device=input_device, output_device=output_device)
    if echo_test:
        from r2d2voice.audio.echotest import run_echo_test

        run_echo_test(settings.input_device, settings.output_device)
        return
    from r2d2voice.audio.devices import devices_command

    devices_command()


COMMANDS = (devices,)
