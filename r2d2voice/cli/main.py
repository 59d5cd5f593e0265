"""The ``r2d2voice`` command: the group, its global options, and errors mapped to exit codes.

Command bodies live in their rooms and load inside the commands, so ``r2d2voice --help`` stays
fast and needs neither trio, numpy nor PortAudio.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

import click

from r2d2voice import __version__
from r2d2voice.cli import conversation, devices, events, fleet, memory, records, tools
from r2d2voice.cli.output import OutputFailed, flush_stdout, guard_stdout, quiet_stdout
from r2d2voice.errors import EXIT_OK, EXIT_RUNTIME, R2Error

if TYPE_CHECKING:
    from r2d2voice.system.config import Settings

#: Settings keys of the flags a command may pass to :meth:`Invocation.settings`, and the flag
#: as messages name it (``--`` + the name with dashes unless said here).
FLAG_KEYS = {
    "db": "R2D2_DB", "backend": "R2D2_BACKEND", "input_device": "R2D2_INPUT_DEVICE",
    "output_device": "R2D2_OUTPUT_DEVICE", "output_latency": "R2D2_OUTPUT_LATENCY",
    "log_level": "R2D2_LOG_LEVEL", "duplex": "R2D2_DUPLEX", "tools": "R2D2_TOOLS",
    "listen": "R2D2_LISTEN", "ship_url": "R2D2_SHIP_URL", "device_id": "R2D2_DEVICE_ID",
}
FLAG_NAMES = {"ship_url": "--to"}
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Invocation:
    """The global options, handed to every command as ``ctx.obj``."""

    env_file: str | None
    log_level: str | None

    def settings(self, **flags: Any) -> Settings:
        """Settings from ``flags`` > environment > env file; sets up logging, key scrubbed."""
        return _settings(self, **flags)


def _settings(invocation: Invocation, **flags: Any) -> Settings:
    from r2d2voice.system.config import load_settings
    from r2d2voice.system.logs import setup_logging

    given = {**flags, "log_level": invocation.log_level}
    mapped = {FLAG_KEYS[k]: (None if v is None else str(v),
                             FLAG_NAMES.get(k, "--" + k.replace("_", "-")))
              for k, v in given.items()}
    # warnings while loading (a misspelt key, a world-readable env file) look like the rest
    setup_logging(invocation.log_level or "INFO")
    settings = load_settings(env_file=invocation.env_file, flags=mapped)
    setup_logging(settings.log_level, secrets=settings.secrets())
    return settings


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"r2d2voice: error: {message}", err=True)
    sys.exit(code)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups from nurseries, depth first."""
    inner = getattr(exc, "exceptions", None)
    if not inner:
        return [exc]
    return [leaf for e in inner for leaf in _leaves(e)]


def exit_for(exc: BaseException) -> NoReturn:
    """One line on stderr and the exit code for a failed command; never a traceback."""
    leaves = _leaves(exc)
    found = next((e for e in leaves if isinstance(e, R2Error)), None)
    if found is not None:
        if isinstance(found, OutputFailed):  # nothing more goes there, not even at exit
            quiet_stdout()
        _fail(str(found), found.exit_code)
    leaf = leaves[0]
    if isinstance(leaf, KeyboardInterrupt):
        _fail("interrupted", EXIT_INTERRUPTED)
    if isinstance(leaf, (SystemExit, click.exceptions.Exit)):
        raise leaf
    if any(isinstance(e, BrokenPipeError) for e in leaves):
        # the reader went away (``| head``): a normal end, so ``set -o pipefail`` scripts work
        quiet_stdout(stderr=True)
        sys.exit(EXIT_OK)
    # a bug, or something we did not foresee: still one line
    logging.getLogger("r2d2voice").debug("unexpected failure", exc_info=leaf)
    _fail(f"unexpected {type(leaf).__name__}: {leaf}", EXIT_RUNTIME)


def _misspelt(exc: click.ClickException) -> bool:
    """An unknown option or command: click's own usage block, with its "Did you mean"."""
    return isinstance(exc, click.NoSuchOption) or (
        isinstance(exc, click.UsageError) and exc.message.startswith("No such command"))


def click_failure(exc: click.ClickException) -> NoReturn:
    """click's own errors: its usage block for a misspelt option or command, else one line
    (a bad value, a missing argument) with where the usage is; exit 2 (or click's code)."""
    if _misspelt(exc):
        exc.show()
        sys.exit(exc.exit_code)
    message = exc.format_message().strip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if isinstance(exc, click.UsageError) and ctx else ""
    _fail(" ".join(f"{message}{hint}".split()), exc.exit_code)


class _Group(click.Group):
    """Runs each command with its failures mapped by :func:`exit_for` (click's own by
    :func:`click_failure`), its standard output guarded (see :mod:`r2d2voice.cli.output`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        guard_stdout()  # before --help or --version may write
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:  # the global options
            click_failure(exc)
        except (OutputFailed, BrokenPipeError) as exc:  # --help, --version
            exit_for(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            flush_stdout()  # a failure to write is the command's, with its one line
            return result
        except click.ClickException as exc:
            click_failure(exc)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise  # --help, and exits already decided
        except BaseException as exc:  # outside trio: every failure becomes one line and a code
            exit_for(exc)


_ENV_FILE_HELP = "Env file to read (default: ./.env, else ~/.r2d2/.env)."
_LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


@click.group(cls=_Group, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="r2d2voice")
@click.option("--env-file", metavar="FILE", default=None, help=_ENV_FILE_HELP)
@click.option("--log-level", type=_LOG_LEVELS, default=None, help="Overrides R2D2_LOG_LEVEL.")
@click.pass_context
def main(ctx: click.Context, env_file: str | None, log_level: str | None) -> None:
    """r2d2voice: an always-on voice appliance on OpenAI's Realtime API (or its local stand-in).

    Global options may come before or after the command.
    """
    ctx.obj = Invocation(env_file=env_file, log_level=log_level)
    if ctx.invoked_subcommand is None:  # a bare `r2d2voice` asks what there is: the help
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)


def _set_global(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """A global option given after the command: it overrides the one given before."""
    if value is not None and isinstance(ctx.obj, Invocation):
        ctx.obj = replace(ctx.obj, **{str(param.name): value})


def _with_global_options(command: click.Command) -> click.Command:
    """``r2d2voice replay x.wav --log-level debug`` works as ``r2d2voice --log-level debug
    replay x.wav`` does."""
    command.params += [
        click.Option(["--env-file"], metavar="FILE", default=None, expose_value=False,
                     callback=_set_global, help=_ENV_FILE_HELP),
        click.Option(["--log-level"], type=_LOG_LEVELS, default=None, expose_value=False,
                     callback=_set_global, help="Overrides R2D2_LOG_LEVEL."),
    ]
    if isinstance(command, click.Group):  # ``memory list --log-level debug`` too
        for sub in command.commands.values():
            _with_global_options(sub)
    return command


for _command in (*conversation.COMMANDS, *records.COMMANDS, *fleet.COMMANDS, *tools.COMMANDS,
                 *memory.COMMANDS, *devices.COMMANDS, *events.COMMANDS):
    main.add_command(_with_global_options(_command))
