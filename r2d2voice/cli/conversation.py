"""``replay``, ``run``, ``serve-local`` and ``wake``: the commands that hold, serve or start a
conversation."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from r2d2voice.cli.checks import robot_db
from r2d2voice.cli.options import (
    Seconds,
    backend_option,
    db_option,
    listen_option,
    tools_option,
    url_option,
)
from r2d2voice.cli.output import keep_going_when_closed

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation

F = TypeVar("F", bound=Callable[..., Any])


def conversation_options(command: F) -> F:
    """--db, --backend, --url, --tools, --listen (in that order in --help) and the invocation:
    what every command that holds a conversation takes."""
    command = click.pass_obj(command)
    for option in (listen_option, tools_option, url_option, backend_option, db_option):
        command = option(command)
    return command


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reply audio, a .wav file (default: FILE's name + .reply.wav here; "
                   "hello.wav -> hello.reply.wav).")
@click.option("--speed", type=click.Choice(["fast", "realtime"]), default="fast", show_default=True,
              help="fast: as fast as the conversation allows; realtime: paced like a person.")
@click.option("--timeout", type=Seconds(min=1), default=None,
              help="Give up after this many seconds (default: 60 s + 3x the file's length).")
@conversation_options
def replay(invocation: Invocation, file: Path, out: Path | None, speed: str,
           timeout: float | None, db: str | None, backend: str | None, url: str | None,
           tools: str | None, listen: str | None) -> None:
    """Hold a conversation with FILE (any WAV) as the microphone; write the replies to --out."""
    settings = invocation.settings(db=db, backend=backend, tools=tools, listen=listen)
    robot_db(settings, "replay")
    keep_going_when_closed()  # `replay x.wav | head -1`: every turn is still held and stored
    from r2d2voice.appliance.replay_file import replay_command

    replay_command(settings, file, out=out, speed=speed, timeout=timeout, url=url)


@click.command()
@click.option("--input-device", default=None, help="Microphone: index or name substring.")
@click.option("--output-device", default=None, help="Speaker: index or name substring.")
@click.option("--output-latency", type=float, default=None,
              help="Speaker latency in seconds (small boards: ~0.03 avoids crackle).")
@click.option("--duplex", type=click.Choice(["half", "full"]), default=None,
              help="half: mic muted while the robot speaks; full: headset or echo-cancelled mic.")
@conversation_options
def run(invocation: Invocation, input_device: str | None, output_device: str | None,
        output_latency: float | None, duplex: str | None, db: str | None, backend: str | None,
        url: str | None, tools: str | None, listen: str | None) -> None:
    """Talk through the microphone and speaker until SIGTERM/SIGINT (what systemd starts)."""
    settings = invocation.settings(db=db, backend=backend, input_device=input_device,
                                   output_device=output_device, output_latency=output_latency,
                                   duplex=duplex, tools=tools, listen=listen)
    robot_db(settings, "run")
    keep_going_when_closed()
    from r2d2voice.appliance.service import run_command

    run_command(settings, url=url)


@click.command("serve-local")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--script", type=click.Path(dir_okay=False), default=None,
              help="What each turn says or which tool it calls (TOML or JSON).")
@click.option("--fault", "faults", multiple=True, metavar="NAME[=VALUE]",
              help="Misbehave like the real service does at times (repeatable), "
                   "e.g. --fault close_after_responses=2.")
@click.pass_obj
def serve_local(invocation: Invocation, host: str, port: int, script: str | None,
                faults: tuple[str, ...]) -> None:
    """Run the Realtime-compatible local backend (beeps, no speech understanding)."""
    invocation.settings()
    from r2d2voice.errors import UsageError
    from r2d2voice.localbackend.command import (
        BackendOptionError,
        ListenError,
        backend_config,
        serve_local_command,
    )

    try:  # the local backend is a peer that knows no exit codes
        config = backend_config(faults, script)
        serve_local_command(host, port, config)
    except (ListenError, BackendOptionError) as exc:
        raise UsageError(str(exc)) from None


@click.command()
@click.pass_obj
def wake(invocation: Invocation) -> None:
    """Tell the running `r2d2voice run` to start a conversation (as its wake word would)."""
    invocation.settings()
    from r2d2voice.system.control import send_wake

    click.echo(send_wake(), file=sys.stdout)  # the guarded stdout (cli.output)


COMMANDS = (replay, run, serve_local, wake)
