"""The ``r2d2voice`` command. Heavy modules (trio, numpy, sounddevice) load inside commands, so
``r2d2voice --help`` stays fast and works without PortAudio."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from r2d2voice import __version__
from r2d2voice.errors import EXIT_RUNTIME, R2Error, UsageError


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"r2d2voice: error: {message}", err=True)
    sys.exit(code)


def _first_r2error(exc: BaseException) -> R2Error | None:
    """The R2Error inside ``exc``, looking through (nested) exception groups from nurseries."""
    if isinstance(exc, R2Error):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _first_r2error(inner)
        if found is not None:
            return found
    return None


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: R2Error -> its one-line message and exit code, never a traceback."""
    try:
        return fn()
    except R2Error as exc:
        _fail(str(exc), exc.exit_code)
    except BaseException as exc:
        found = _first_r2error(exc)
        if found is None:
            return _unexpected(exc)
        _fail(str(found), found.exit_code)


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)
    return _leaf(inner[0]) if inner else exc


def _unexpected(exc: BaseException) -> Any:
    try:
        raise _leaf(exc)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click.exceptions.Exit:
        raise
    except Exception as exc:  # a bug, or something we did not foresee: still one line
        import logging

        logging.getLogger("r2d2voice").debug("unexpected failure", exc_info=exc)
        _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_RUNTIME)


def _settings(ctx: click.Context, **flags: Any) -> Any:
    """Settings from flags > environment > env file; sets up logging with the key scrubbed."""
    from r2d2voice.system.config import load_settings
    from r2d2voice.system.logs import setup_logging

    names = {
        "db": "R2D2_DB", "backend": "R2D2_BACKEND", "url": "REALTIME_URL",
        "model": "REALTIME_MODEL", "voice": "REALTIME_VOICE", "input_device": "R2D2_INPUT_DEVICE",
        "output_device": "R2D2_OUTPUT_DEVICE", "output_latency": "R2D2_OUTPUT_LATENCY",
        "log_level": "R2D2_LOG_LEVEL", "duplex": "R2D2_DUPLEX",
    }
    opts = {**flags, "log_level": ctx.obj.get("log_level")}
    mapped = {
        names[k]: (None if v is None else str(v), "--" + k.replace("_", "-"))
        for k, v in opts.items() if k in names
    }
    settings = load_settings(env_file=ctx.obj.get("env_file"), flags=mapped)
    setup_logging(settings.log_level, secrets=[settings.api_key] if settings.api_key else [])
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="r2d2voice")
@click.option("--env-file", type=click.Path(dir_okay=False), default=None,
              help="Env file to read (default: ./.env, else ~/.r2d2/.env).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
              case_sensitive=False), default=None, help="Overrides R2D2_LOG_LEVEL.")
@click.pass_context
def main(ctx: click.Context, env_file: str | None, log_level: str | None) -> None:
    """r2d2voice: an always-on voice appliance on OpenAI's Realtime API (or its local stand-in)."""
    ctx.ensure_object(dict)
    ctx.obj.update(env_file=env_file, log_level=log_level)


_db_option = click.option("--db", type=click.Path(dir_okay=False), default=None,
                          help="Transcript database (default: R2D2_DB, then the state dir).")
_backend_option = click.option("--backend", type=click.Choice(["openai", "local"]), default=None,
                               help="Service: OpenAI, or the embedded local backend.")
_url_option = click.option("--url", default=None,
                           help="Realtime websocket URL for this command (overrides REALTIME_URL).")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reply audio WAV (default: <FILE stem>.reply.wav in the current directory).")
@click.option("--speed", type=click.Choice(["fast", "realtime"]), default="fast", show_default=True,
              help="fast: as fast as the conversation allows; realtime: paced like a person.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Give up after this many seconds (default: 60 s + 3x the file's length).")
@_db_option
@_backend_option
@_url_option
@click.pass_context
def replay(ctx: click.Context, file: Path, out: Path | None, speed: str, timeout: float | None,
           db: str | None, backend: str | None, url: str | None) -> None:
    """Hold a conversation with FILE (any WAV) as the microphone; write the replies to --out."""

    def body() -> None:
        settings = _settings(ctx, db=db, backend=backend)
        from r2d2voice.appliance.commands import replay_command

        replay_command(settings, file, out=out, speed=speed, timeout=timeout, url=url)

    _guard(body)


@main.command()
@click.option("--input-device", default=None, help="Microphone: index or name substring.")
@click.option("--output-device", default=None, help="Speaker: index or name substring.")
@click.option("--output-latency", type=float, default=None,
              help="Speaker latency in seconds (small boards: ~0.03 avoids crackle).")
@click.option("--duplex", type=click.Choice(["half", "full"]), default=None,
              help="half: mic muted while the robot speaks; full: headset or echo-cancelled mic.")
@_db_option
@_backend_option
@_url_option
@click.pass_context
def run(ctx: click.Context, input_device: str | None, output_device: str | None,
        output_latency: float | None, duplex: str | None, db: str | None, backend: str | None,
        url: str | None) -> None:
    """Talk through the microphone and speaker until SIGTERM/SIGINT (what systemd starts)."""

    def body() -> None:
        settings = _settings(ctx, db=db, backend=backend, input_device=input_device,
                             output_device=output_device, output_latency=output_latency,
                             duplex=duplex)
        from r2d2voice.appliance.commands import run_command

        run_command(settings, url=url)

    _guard(body)


@main.command()
@_db_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "markdown"]),
              default="jsonl", show_default=True)
@click.option("--session", "sessions", multiple=True, help="Only this session (repeatable).")
@click.option("--since", default=None, help="ISO 8601 date or datetime (UTC if no offset).")
@click.option("--until", default=None, help="ISO 8601 date or datetime; a date covers that day.")
@click.option("--role", type=click.Choice(["user", "assistant"]), default=None)
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write here instead of stdout.")
@click.pass_context
def export(ctx: click.Context, db: str | None, fmt: str, sessions: tuple[str, ...],
           since: str | None, until: str | None, role: str | None, output: str | None) -> None:
    """Dump transcripts as JSONL, CSV or Markdown, streaming."""

    def body() -> None:
        settings = _settings(ctx, db=db)
        from r2d2voice.reports.export import run_export

        if output is None:
            run_export(settings.db, fmt=fmt, out=sys.stdout, sessions=sessions, since=since,
                       until=until, role=role)
            return
        # write next to the target and rename at the end: a failed export leaves no file behind
        import os
        import tempfile

        target = Path(output)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
        try:
            with open(fd, "w", encoding="utf-8", newline="") as fh:
                run_export(settings.db, fmt=fmt, out=fh, sessions=sessions, since=since,
                           until=until, role=role)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    _guard(body)


@main.command()
@_db_option
@click.pass_context
def sessions(ctx: click.Context, db: str | None) -> None:
    """List sessions: id, start, end, turns."""

    def body() -> None:
        settings = _settings(ctx, db=db)
        from r2d2voice.reports.export import format_sessions
        from r2d2voice.storage.store import Store

        with Store.open(settings.db, create=False) as store:
            click.echo(format_sessions(store.list_sessions()), nl=False)

    _guard(body)


@main.command()
@click.pass_context
def devices(ctx: click.Context) -> None:
    """List audio inputs and outputs (index, name, channels, default rate; * = default)."""

    def body() -> None:
        _settings(ctx)
        from r2d2voice.audio.devices import format_devices, list_devices

        click.echo(format_devices(list_devices()))

    _guard(body)


@main.command("serve-local")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.pass_context
def serve_local_cmd(ctx: click.Context, host: str, port: int) -> None:
    """Run the Realtime-compatible local backend (beeps, no speech understanding)."""

    def body() -> None:
        _settings(ctx)
        from r2d2voice.appliance.commands import serve_local_command

        serve_local_command(host, port)

    _guard(body)


_since_option = click.option("--since", default=None,
                             help="ISO 8601 date or datetime (UTC if no offset).")
_until_option = click.option("--until", default=None,
                             help="ISO 8601 date or datetime; a date covers that day.")
_session_option = click.option("--session", "sessions", multiple=True,
                               help="Only this session (repeatable).")
_report_format_option = click.option("--format", "fmt", type=click.Choice(["text", "json"]),
                                     default="text", show_default=True)


def _report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db, --since, --until, --session, --format for the report commands."""
    for option in (_report_format_option, _session_option, _until_option, _since_option,
                   _db_option):
        fn = option(fn)
    return fn


@main.command()
@_report_options
@click.pass_context
def usage(ctx: click.Context, db: str | None, since: str | None, until: str | None,
          sessions: tuple[str, ...], fmt: str) -> None:
    """Token usage per day and per session, with an estimated cost (prices: R2D2_PRICE_*)."""

    def body() -> None:
        settings = _settings(ctx, db=db)
        from r2d2voice.reports.reports import run_usage

        run_usage(settings.db, out=sys.stdout, settings=settings, fmt=fmt, sessions=sessions,
                  since=since, until=until)

    _guard(body)


@main.command()
@_report_options
@click.pass_context
def stats(ctx: click.Context, db: str | None, since: str | None, until: str | None,
          sessions: tuple[str, ...], fmt: str) -> None:
    """Reply latency percentiles, responses by status, interruptions and pipeline counters."""

    def body() -> None:
        settings = _settings(ctx, db=db)
        from r2d2voice.reports.reports import run_stats

        run_stats(settings.db, out=sys.stdout, fmt=fmt, sessions=sessions, since=since,
                  until=until)

    _guard(body)
