"""Options shared by several commands, and the option types they need."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from r2d2voice.errors import UsageError
from r2d2voice.system.config import BACKENDS


class Seconds(click.FloatRange):
    """A finite number of seconds of at least ``min`` (``nan`` and ``inf`` are no duration)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


def _websocket_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--url`` must be a websocket URL: one line, exit 2, before anything starts."""
    if value is not None and not value.startswith(("ws://", "wss://")):
        raise UsageError(f"--url {value}: expected a ws:// or wss:// websocket URL "
                         "(the Realtime endpoint, e.g. ws://127.0.0.1:8765/v1/realtime)")
    return value


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--db ""`` names no database: a bad invocation (exit 2), not the default one."""
    if value is not None and not value.strip():
        raise UsageError(f"--{param.name} {value!r}: an empty path; name the database file "
                         "(or leave the option out for the default)")
    return value


db_option = click.option("--db", metavar="PATH", default=None, callback=_not_empty,
                         help="Transcript database (default: R2D2_DB, then the state dir).")
backend_option = click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
                              help="Service: OpenAI's Realtime API, Azure OpenAI, OpenAI's "
                                   "GPT-Live, or the embedded local backend.")
url_option = click.option("--url", default=None, callback=_websocket_url,
                          help="Websocket URL for this command (overrides REALTIME_URL, or "
                               "R2D2_LIVE_URL with --backend live).")
tools_option = click.option("--tools", type=click.Path(dir_okay=False), default=None,
                            help="Tools file (TOML) the model may call (overrides R2D2_TOOLS).")
listen_option = click.option("--listen", type=click.Choice(["always", "wake"]), default=None,
                             help="always: every utterance is heard; wake: a conversation "
                                  "starts with the wake word (R2D2_WAKE_WORD).")
since_option = click.option("--since", default=None,
                            help="ISO 8601 date or datetime (UTC if no offset).")
until_option = click.option("--until", default=None,
                            help="ISO 8601 date or datetime; a date covers that day.")
session_option = click.option("--session", "sessions", multiple=True,
                              help="Only this session (repeatable).")
fleet_db_option = click.option(
    "--db", metavar="PATH|URL", default=None, callback=_not_empty,
    help="Transcript database, or a fleet server (postgresql://…; default: R2D2_DB).")
device_option = click.option("--device", "devices", multiple=True,
                             help="Only this robot of a fleet database (repeatable).")


def report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db (file or fleet), --device, --since, --until, --session, --format text|json."""
    fmt = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                       show_default=True)
    for option in (fmt, session_option, until_option, since_option, device_option,
                   fleet_db_option):
        fn = option(fn)
    return fn
