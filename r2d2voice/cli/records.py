"""``export``, ``sessions``, ``usage``, ``stats`` (reading the record back, from this robot's
database or a fleet server) and ``prune`` (deleting old conversations)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from r2d2voice.cli.checks import robot_db
from r2d2voice.cli.options import (
    db_option,
    device_option,
    fleet_db_option,
    report_options,
    session_option,
    since_option,
    until_option,
)
from r2d2voice.errors import UsageError

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation
    from r2d2voice.system.config import Settings

def _source(invocation: Invocation, db: str | None,
            devices: tuple[str, ...]) -> tuple[Settings, Any, dict[str, Any]]:
    """Settings, what to read (a database path, or a fleet URL as ``--db`` or R2D2_DB gave
    it) and the keywords that go with it (``devices`` for a fleet)."""
    settings = invocation.settings(db=db)
    if settings.fleet_db is not None:
        return settings, settings.fleet_db, {"devices": devices}
    if devices:
        raise UsageError("--device selects robots of a fleet database: use it with "
                         "--db postgresql://…")
    return settings, settings.db, {}


@click.command()
@fleet_db_option
@device_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "markdown"]),
              default="jsonl", show_default=True)
@session_option
@since_option
@until_option
@click.option("--role", type=click.Choice(["user", "assistant", "tool"]), default=None)
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write here instead of stdout.")
@click.pass_obj
def export(invocation: Invocation, db: str | None, devices: tuple[str, ...], fmt: str,
           sessions: tuple[str, ...], since: str | None, until: str | None, role: str | None,
           output: str | None) -> None:
    """Dump transcripts as JSONL, CSV or Markdown, streaming."""
    _, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.export import export_command

    export_command(target, fmt=fmt, sessions=sessions, since=since, until=until, role=role,
                   output=output, **fleet)


@click.command()
@fleet_db_option
@device_option
@click.pass_obj
def sessions(invocation: Invocation, db: str | None, devices: tuple[str, ...]) -> None:
    """List sessions: id, start, end, turns, backend, model."""
    _, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.sessions import sessions_command

    sessions_command(target, **fleet)


@click.command()
@report_options
@click.pass_obj
def usage(invocation: Invocation, db: str | None, devices: tuple[str, ...], since: str | None,
          until: str | None, sessions: tuple[str, ...], fmt: str) -> None:
    """Token usage per day and per session, with an estimated cost (prices: R2D2_PRICE_*)."""
    settings, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.usage import usage_command

    usage_command(target, settings=settings, fmt=fmt, sessions=sessions, since=since,
                  until=until, **fleet)


@click.command()
@report_options
@click.pass_obj
def stats(invocation: Invocation, db: str | None, devices: tuple[str, ...], since: str | None,
          until: str | None, sessions: tuple[str, ...], fmt: str) -> None:
    """Reply latency percentiles, responses by status, interruptions and pipeline counters."""
    _, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.stats import stats_command

    stats_command(target, fmt=fmt, sessions=sessions, since=since, until=until, **fleet)


@click.command()
@click.option("--older-than", default=None,
              help="Age of the conversations to delete, e.g. 30d, 12h, 2w "
                   "(default: R2D2_RETENTION_DAYS).")
@db_option
@click.pass_obj
def prune(invocation: Invocation, older_than: str | None, db: str | None) -> None:
    """Delete old conversations (only those shipped, when R2D2_SHIP_URL is set) and give the
    space back."""
    settings = invocation.settings(db=db)
    robot_db(settings, "prune", existing=True)
    from r2d2voice.storage.retention import prune_command

    only_shipped = None
    if settings.ship_url:
        from r2d2voice.storage.shipping.local import shipped_sessions

        only_shipped = shipped_sessions
    prune_command(settings.db, older_than=older_than, retention_days=settings.retention_days,
                  only_shipped=only_shipped)


COMMANDS = (export, sessions, usage, stats, prune)
