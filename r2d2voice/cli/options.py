"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

db_option = click.option("--db", type=click.Path(dir_okay=False), default=None,
                         help="Transcript database (default: R2D2_DB, then the state dir).")
backend_option = click.option("--backend", type=click.Choice(["openai", "local"]), default=None,
                              help="Service: OpenAI, or the embedded local backend.")
url_option = click.option("--url", default=None,
                          help="Realtime websocket URL for this command (overrides REALTIME_URL).")
since_option = click.option("--since", default=None,
                            help="ISO 8601 date or datetime (UTC if no offset).")
until_option = click.option("--until", default=None,
                            help="ISO 8601 date or datetime; a date covers that day.")
session_option = click.option("--session", "sessions", multiple=True,
                              help="Only this session (repeatable).")


def report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db, --since, --until, --session, --format text|json for the report commands."""
    fmt = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                       show_default=True)
    for option in (fmt, session_option, until_option, since_option, db_option):
        fn = option(fn)
    return fn
