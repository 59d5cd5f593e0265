"""``export``, ``sessions``, ``usage`` and ``stats``: reading the record back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from r2d2voice.cli.options import (
    db_option,
    report_options,
    session_option,
    since_option,
    until_option,
)

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation


@click.command()
@db_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "markdown"]),
              default="jsonl", show_default=True)
@session_option
@since_option
@until_option
@click.option("--role", type=click.Choice(["user", "assistant"]), default=None)
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write here instead of stdout.")
@click.pass_obj
def export(invocation: Invocation, db: str | None, fmt: str, sessions: tuple[str, ...],
           since: str | None, until: str | None, role: str | None, output: str | None) -> None:
    """Dump transcripts as JSONL, CSV or Markdown, streaming."""
    settings = invocation.settings(db=db)
    from r2d2voice.reports.export import export_command

    export_command(settings.db, fmt=fmt, sessions=sessions, since=since, until=until, role=role,
                   output=output)


@click.command()
@db_option
@click.pass_obj
def sessions(invocation: Invocation, db: str | None) -> None:
    """List sessions: id, start, end, turns."""
    settings = invocation.settings(db=db)
    from r2d2voice.reports.sessions import sessions_command

    sessions_command(settings.db)


@click.command()
@report_options
@click.pass_obj
def usage(invocation: Invocation, db: str | None, since: str | None, until: str | None,
          sessions: tuple[str, ...], fmt: str) -> None:
    """Token usage per day and per session, with an estimated cost (prices: R2D2_PRICE_*)."""
    settings = invocation.settings(db=db)
    from r2d2voice.reports.usage import usage_command

    usage_command(settings.db, settings=settings, fmt=fmt, sessions=sessions, since=since,
                  until=until)


@click.command()
@report_options
@click.pass_obj
def stats(invocation: Invocation, db: str | None, since: str | None, until: str | None,
          sessions: tuple[str, ...], fmt: str) -> None:
    """Reply latency percentiles, responses by status, interruptions and pipeline counters."""
    settings = invocation.settings(db=db)
    from r2d2voice.reports.stats import stats_command

    stats_command(settings.db, fmt=fmt, sessions=sessions, since=since, until=until)


COMMANDS = (export, sessions, usage, stats)
