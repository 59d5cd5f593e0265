"""``replay``, ``run`` and ``serve-local``: the commands that hold or serve a conversation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from r2d2voice.cli.options import backend_option, db_option, url_option

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reply audio WAV (default: <FILE stem>.reply.wav in the current directory).")
@click.option("--speed", type=click.Choice(["fast", "realtime"]), default="fast", show_default=True,
              help="fast: as fast as the conversation allows; realtime: paced like a person.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Give up after this many seconds (default: 60 s + 3x the file's length).")
@db_option
@backend_option
@url_option
@click.pass_obj
def replay(invocation: Invocation, file: Path, out: Path | None, speed: str,
           timeout: float | None, db: str | None, backend: str | None, url: str | None) -> None:
    """Hold a conversation with FILE (any WAV) as the microphone; write the replies to --out."""
    settings = invocation.settings(db=db, backend=backend)
    from r2d2voice.appliance.replay_file import replay_command

    replay_command(settings, file, out=out, speed=speed, timeout=timeout, url=url)


@click.command()
@click.option("--input-device", default=None, help="Microphone: index or name substring.")
@click.option("--output-device", default=None, help="Speaker: index or name substring.")
@click.option("--output-latency", type=float, default=None,
              help="Speaker latency in seconds (small boards: ~0.03 avoids crackle).")
@click.option("--duplex", type=click.Choice(["half", "full"]), default=None,
              help="half: mic muted while the robot speaks; full: headset or echo-cancelled mic.")
@db_option
@backend_option
@url_option
@click.pass_obj
def run(invocation: Invocation, input_device: str | None, output_device: str | None,
        output_latency: float | None, duplex: str | None, db: str | None, backend: str | None,
        url: str | None) -> None:
    """Talk through the microphone and speaker until SIGTERM/SIGINT (what systemd starts)."""
    settings = invocation.settings(db=db, backend=backend, input_device=input_device,
                                   output_device=output_device, output_latency=output_latency,
                                   duplex=duplex)
    from r2d2voice.appliance.service import run_command

    run_command(settings, url=url)


@click.command("serve-local")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.pass_obj
def serve_local(invocation: Invocation, host: str, port: int) -> None:
    """Run the Realtime-compatible local backend (beeps, no speech understanding)."""
    invocation.settings()
    from r2d2voice.errors import UsageError
    from r2d2voice.localbackend.command import ListenError, serve_local_command

    try:
        serve_local_command(host, port)
    except ListenError as exc:  # the local backend is a peer that knows no exit codes
        raise UsageError(str(exc)) from None


COMMANDS = (replay, run, serve_local)
