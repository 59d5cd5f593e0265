"""``memory list | search QUERY | forget QUERY | add TEXT``: what the robot remembers, for the
person who owns it (list and search also read a fleet server: ``--db postgresql://…``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from r2d2voice.cli.options import db_option, device_option, fleet_db_option
from r2d2voice.cli.records import _source
from r2d2voice.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from r2d2voice.cli.main import Invocation

_FLEET_SCHEMES = ("postgresql://", "postgres://")
_format = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                       show_default=True)


@click.group()
def memory() -> None:
    """What the robot remembers: facts it was asked to keep, and what was said before."""


@memory.command("list")
@fleet_db_option
@device_option
@_format
@click.pass_obj
def list_(invocation: Invocation, db: str | None, devices: tuple[str, ...], fmt: str) -> None:
    """The remembered facts, newest first."""
    _, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.memory import memory_list_command

    memory_list_command(target, fmt=fmt, **fleet)


@memory.command()
@click.argument("query")
@fleet_db_option
@device_option
@_format
@click.pass_obj
def search(invocation: Invocation, query: str, db: str | None, devices: tuple[str, ...],
           fmt: str) -> None:
    """What recall finds for QUERY: facts, and passages of past conversations."""
    _, target, fleet = _source(invocation, db, devices)
    from r2d2voice.reports.memory import memory_search_command

    memory_search_command(target, query, fmt=fmt, **fleet)


def _local_db(invocation: Invocation, db: str | None, command: str) -> str:
    if db is not None and db.lower().startswith(_FLEET_SCHEMES):
        raise UsageError(f"memory {command} changes this robot's database; a fleet server "
                         "(--db postgresql://…) is only read (list, search)")
    return str(invocation.settings(db=db).db)


@memory.command()
@click.argument("query")
@db_option
@click.pass_obj
def forget(invocation: Invocation, query: str, db: str | None) -> None:
    """Forget the facts holding every word of QUERY; passages of past conversations holding
    every word are no longer recalled (the record keeps them)."""
    path = _local_db(invocation, db, "forget")
    from r2d2voice.storage.memory_command import memory_forget_command

    memory_forget_command(path, query)


@memory.command()
@click.argument("text")
@db_option
@click.pass_obj
def add(invocation: Invocation, text: str, db: str | None) -> None:
    """Remember TEXT (at most 500 characters) as a fact."""
    path = _local_db(invocation, db, "add")
    settings = invocation.settings(db=db)
    if not settings.store_text:
        raise ConfigError(f"memory add: R2D2_STORE_TEXT is false {settings.where('store_text')}"
                          " (privacy mode): no memory is kept")
    from r2d2voice.storage.memory_command import memory_add_command

    memory_add_command(path, text)


COMMANDS = (memory,)
