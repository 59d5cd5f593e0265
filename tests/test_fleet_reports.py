"""Reading the fleet: ``export``, ``sessions``, ``usage`` and ``stats`` with ``--db
postgresql://…`` and ``--device``, against a real PostgreSQL server (``pg_server``).

Three robots write their databases as a run does; their rows go to one fleet server; each
report from the server must be the robot's own report with ``device_id`` added."""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result
from pg import PASSWORD, PgServer
from storage_support import (
    add_live_session,
    add_local_session,
    add_wake_sessions,
    record_a_conversation_with_tools,
    write_report_db,
)

from r2d2voice.cli.main import main
from r2d2voice.reports.export import COLUMNS, FLEET_COLUMNS
from r2d2voice.storage.shipping.fleet import open_fleet
from r2d2voice.storage.shipping.server_schema import SERVER_SCHEMA_VERSION
from r2d2voice.storage.shipping.tables import TABLES

ROBOTS = ("attic", "hall", "kitchen")  # the server's order: by device id


def ship(db: Path, url: str, device: str) -> None:
    """Every row of a robot's database onto the fleet server as ``device`` (what the
    shipper does, table by table, sessions first)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        with open_fleet(url) as fleet:
            for table, spec in TABLES.items():
                rows = conn.execute(f"SELECT {', '.join(spec.columns)} FROM {table}")
                batch = [dict(r) for r in rows]
                if batch:
                    fleet.upsert(table, device, batch)
    finally:
        conn.close()


@contextmanager
def shipped_as_hall(pg_server: PgServer, db: Path) -> Iterator[str]:
    """A fresh fleet database holding ``db`` as robot ``hall``: its URL; dropped after."""
    name = pg_server.create_database()
    try:
        url = pg_server.url(name)
        ship(db, url, "hall")
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def fleet(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[tuple[str, dict[str, Path]]]:
    """A fleet server holding three robots: ``kitchen`` (a conversation with tool calls),
    ``hall`` (three sessions over two days with usage, latencies, errors, counters) and
    ``attic`` (the kitchen's conversation in privacy mode); and each robot's database."""
    tmp = tmp_path_factory.mktemp("robots")
    dbs = {name: tmp / f"{name}.db" for name in ROBOTS}
    trio.run(record_a_conversation_with_tools, dbs["kitchen"])
    trio.run(lambda: record_a_conversation_with_tools(dbs["attic"], store_text=False))
    write_report_db(dbs["hall"])
    name = pg_server.create_database()
    url = pg_server.url(name)
    for device, db in dbs.items():
        ship(db, url, device)
    yield url, dbs
    pg_server.drop_database(name)


def cli(tmp_path: Path, *args: str) -> Result:
    """``r2d2voice`` in-process, with an empty env file."""
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args])


def out_of(tmp_path: Path, *args: str) -> str:
    result = cli(tmp_path, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------- export


def test_export_jsonl_is_each_robots_export_with_its_device_id(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    local = {d: jsonl(out_of(tmp_path, "export", "--db", str(db))) for d, db in dbs.items()}
    assert [len(rows) for rows in local.values()] == [7, 5, 7]  # all three have rows
    for device in ROBOTS:
        rows = jsonl(out_of(tmp_path, "export", "--db", url, "--device", device))
        assert rows == [{"device_id": device, **r} for r in local[device]]
        assert all(list(r) == list(FLEET_COLUMNS) for r in rows)
    # The privacy-mode robot's rows say so, on the server too.
    attic = jsonl(out_of(tmp_path, "export", "--db", url, "--device", "attic"))
    assert {r["text_kept"] for r in attic} == {False}
    assert {r["text"] for r in attic if r["role"] != "tool"} == {"(not kept)"}
    # No --device: every robot, by device, each in its conversation order; repeated --device
    # selects several.
    everything = jsonl(out_of(tmp_path, "export", "--db", url))
    assert everything == [{"device_id": d, **r} for d in ROBOTS for r in local[d]]
    two = jsonl(out_of(tmp_path, "export", "--db", url, "--device", "kitchen",
                       "--device", "attic"))
    assert two == [{"device_id": d, **r} for d in ("attic", "kitchen") for r in local[d]]


def test_export_filters_on_a_fleet_are_the_robots_filters(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    kitchen = str(dbs["kitchen"])
    for args in (("--role", "tool"), ("--role", "assistant"),
                 ("--since", "2025-11-21T09:30:02"), ("--until", "2025-11-21T09:30:01")):
        local = jsonl(out_of(tmp_path, "export", "--db", kitchen, *args))
        assert local, args  # the filter keeps something, and not everything
        assert len(local) < 7, args
        rows = jsonl(out_of(tmp_path, "export", "--db", url, "--device", "kitchen", *args))
        assert rows == [{"device_id": "kitchen", **r} for r in local], args
    hall_sessions = [line.split()[0] for line in
                     out_of(tmp_path, "sessions", "--db", str(dbs["hall"])).splitlines()[1:]]
    first = hall_sessions[0]
    rows = jsonl(out_of(tmp_path, "export", "--db", url, "--session", first))
    assert [(r["device_id"], r["session_id"], r["seq"], r["role"]) for r in rows] == [
        ("hall", first, 2, "assistant"), ("hall", first, 3, "tool"), ("hall", first, 4, "tool")]


def test_export_csv_from_a_fleet_has_the_device_column_first(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    for device in ("kitchen", "attic"):
        local = list(csv.reader(io.StringIO(
            out_of(tmp_path, "export", "--db", str(dbs[device]), "--format", "csv"),
            newline="")))
        rows = list(csv.reader(io.StringIO(
            out_of(tmp_path, "export", "--db", url, "--device", device, "--format", "csv"),
            newline="")))
        assert local[0] == list(COLUMNS)
        assert rows[0] == list(FLEET_COLUMNS)
        assert rows[1:] == [[device, *r] for r in local[1:]]


def test_export_markdown_from_a_fleet_names_the_robot_of_each_session(
        fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    local = out_of(tmp_path, "export", "--db", str(dbs["kitchen"]), "--format", "markdown")
    md = out_of(tmp_path, "export", "--db", url, "--device", "kitchen", "--format", "markdown")
    assert md.count("Robot `kitchen` · Started 2025-11-21 09:30:00 UTC") == 1
    assert md.replace("Robot `kitchen` · Started", "Started") == local
    everything = out_of(tmp_path, "export", "--db", url, "--format", "markdown")
    robots = [line.split("`")[1] for line in everything.splitlines()
              if line.startswith("Robot `")]
    assert robots == ["attic", "hall", "hall", "kitchen"]  # the sessions with rows


# ---------------------------------------------------------------------------- sessions


def test_sessions_from_a_fleet_add_a_device_column(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    local = {d: out_of(tmp_path, "sessions", "--db", str(db)).splitlines()
             for d, db in dbs.items()}
    text = out_of(tmp_path, "sessions", "--db", url).splitlines()
    assert text[0].split() == ["DEVICE", *local["hall"][0].split()]
    assert [line.split() for line in text[1:]] == [
        [d, *line.split()] for d in ROBOTS for line in local[d][1:]]
    hall = out_of(tmp_path, "sessions", "--db", url, "--device", "hall").splitlines()
    assert [line.split()[1:] for line in hall[1:]] == [line.split() for line in local["hall"][1:]]
    assert len(hall) == 4


# ---------------------------------------------------------------------------- usage, stats


def report(tmp_path: Path, command: str, *args: str) -> dict[str, Any]:
    return json.loads(out_of(tmp_path, command, *args, "--format", "json"))


def test_usage_from_a_fleet_is_per_robot_with_the_device_id(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    local = report(tmp_path, "usage", "--db", str(dbs["hall"]))
    hall = report(tmp_path, "usage", "--db", url, "--device", "hall")
    assert hall["days"] == [{"device_id": "hall", **d} for d in local["days"]]
    assert hall["sessions"] == [{"device_id": "hall", **s} for s in local["sessions"]]
    assert hall["total"] == local["total"]
    assert hall["prices_usd_per_million"] == local["prices_usd_per_million"]
    # Filters are the robot's filters.
    since = ("--since", "2025-11-21")
    assert report(tmp_path, "usage", "--db", url, "--device", "hall", *since)["total"] \
        == report(tmp_path, "usage", "--db", str(dbs["hall"]), *since)["total"]
    # Every robot: a row per robot and day, the total over all of them.
    kitchen = report(tmp_path, "usage", "--db", str(dbs["kitchen"]))
    fleet_all = report(tmp_path, "usage", "--db", url)
    assert [d["device_id"] for d in fleet_all["days"]] == ["attic", "hall", "hall", "kitchen"]
    assert fleet_all["total"]["responses"] == local["total"]["responses"] \
        + 2 * kitchen["total"]["responses"]
    text = out_of(tmp_path, "usage", "--db", url, "--device", "hall")
    assert text.splitlines()[1].split()[:2] == ["DEVICE", "DAY"]
    assert text.splitlines()[2].split()[:2] == ["hall", "2025-11-20"]


def test_usage_from_a_fleet_prices_local_backend_sessions_at_zero(
    pg_server: PgServer, tmp_path: Path
) -> None:
    db = tmp_path / "mixed.db"
    write_report_db(db)  # openai sessions
    local_sid = add_local_session(db)  # and one on the local backend, on day 2
    with shipped_as_hall(pg_server, db) as url:
        here = report(tmp_path, "usage", "--db", str(db))
        there = report(tmp_path, "usage", "--db", url)
        text = out_of(tmp_path, "usage", "--db", url)
    assert there["days"] == [{"device_id": "hall", **d} for d in here["days"]]
    assert there["sessions"] == [{"device_id": "hall", **s} for s in here["sessions"]]
    assert there["total"] == here["total"]
    [local] = [s for s in there["sessions"] if s["session_id"] == local_sid]
    assert (local["output_audio"], local["cost_usd"], local["local_responses"]) == (300, 0, 1)
    assert there["total"]["local_responses"] == 1
    [row] = [line for line in text.splitlines() if line.startswith(f"hall    {local_sid}")]
    assert row.endswith("0.0000  local backend: not billed")


def test_usage_and_stats_from_a_fleet_price_live_sessions_as_the_robot_does(
        pg_server: PgServer, tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    write_report_db(db)
    add_live_session(db)
    with shipped_as_hall(pg_server, db) as url:
        here, there = (report(tmp_path, "usage", "--db", where) for where in (str(db), url))
        assert there["sessions"] == [{"device_id": "hall", **s} for s in here["sessions"]]
        assert there["total"] == here["total"] and there["total"]["live_seconds"] == 45
        stats = [report(tmp_path, "stats", "--db", where)["responses"] for where in (str(db), url)]
        assert stats[0] == stats[1]
        assert "LIVE S" in out_of(tmp_path, "usage", "--db", url)


def test_reading_a_server_without_r2d2voice_data_changes_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    name = pg_server.create_database()
    try:
        url = pg_server.url(name)
        for command in ("export", "sessions", "usage", "stats"):
            result = cli(tmp_path, command, "--db", url)
            assert result.exit_code == 2, result.output
            assert result.stderr == f"r2d2voice: error: no r2d2voice data on {shown(url)}\n"
            assert result.stdout == ""
        with pg_server.connect(name) as conn:  # no schema was created
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                                ).fetchone() == (0,)
        # Shipping creates the schema and says so at INFO ...
        logger = logging.getLogger("r2d2voice.storage.shipping.fleet")
        seen: list[logging.LogRecord] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = seen.append  # type: ignore[method-assign]
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            open_fleet(url).close()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        ready = f"fleet server {shown(url)} ready (schema v{SERVER_SCHEMA_VERSION})"
        assert [(r.levelno, r.getMessage()) for r in seen] == [(logging.INFO, ready)]
        # ... a report reading it says nothing about it, unless asked for DEBUG.
        result = cli(tmp_path, "sessions", "--db", url)
        assert (result.exit_code, result.stdout, result.stderr) \
            == (0, "no sessions recorded\n", "")
        result = cli(tmp_path, "--log-level", "DEBUG", "sessions", "--db", url)
        assert ready in result.stderr
    finally:
        pg_server.drop_database(name)


def shown(url: str) -> str:
    """How messages name the server: the password masked."""
    return url.replace(PASSWORD, "***")


def test_stats_from_a_fleet_cover_the_selected_robots(fleet, tmp_path: Path) -> None:
    url, dbs = fleet
    local = {d: report(tmp_path, "stats", "--db", str(db)) for d, db in dbs.items()}
    hall = report(tmp_path, "stats", "--db", url, "--device", "hall")
    assert hall == {"devices": ["hall"], **local["hall"]}
    assert report(tmp_path, "stats", "--db", url, "--device", "hall", "--since", "2025-11-21") \
        == {"devices": ["hall"],
            **report(tmp_path, "stats", "--db", str(dbs["hall"]), "--since", "2025-11-21")}
    together = report(tmp_path, "stats", "--db", url)
    assert together["devices"] == list(ROBOTS)
    assert together["sessions"] == sum(r["sessions"] for r in local.values())
    assert together["tools"]["calls"] == sum(r["tools"]["calls"] for r in local.values())
    assert together["tools"]["by_tool"]["turn_head"] == {"ok": 3, "running": 1, "timeout": 1}
    assert together["responses"]["total"] == sum(r["responses"]["total"]
                                                 for r in local.values())
    text = out_of(tmp_path, "stats", "--db", url, "--device", "kitchen", "--device", "attic")
    assert text.splitlines()[0] == "Robots: attic, kitchen"


def test_stats_from_a_fleet_report_the_wake_word_mode_as_the_robot_does(
    pg_server: PgServer, tmp_path: Path
) -> None:
    db = tmp_path / "wake.db"
    write_report_db(db)
    add_wake_sessions(db)
    with shipped_as_hall(pg_server, db) as url:
        here = report(tmp_path, "stats", "--db", str(db))
        there = report(tmp_path, "stats", "--db", url)
        text = out_of(tmp_path, "stats", "--db", url)
    assert here["wake"]["wakes"] == 4
    assert there == {"devices": ["hall"], **here}
    assert "Wakes: 4 (external 1, word 3)" in text


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("command", ["export", "sessions", "usage", "stats"])
def test_device_with_a_database_file_is_a_usage_error(fleet, tmp_path: Path,
                                                      command: str) -> None:
    _, dbs = fleet
    result = cli(tmp_path, command, "--db", str(dbs["hall"]), "--device", "hall")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("r2d2voice: error: --device selects robots of a fleet "
                                     "database: use it with --db postgresql://…")
    assert result.stdout == ""


def test_unknown_robot_or_session_on_a_fleet_is_a_usage_error(fleet, tmp_path: Path) -> None:
    url, _ = fleet
    for args, needle in ((("--device", "garage"), "--device: no robot 'garage'"),
                         (("--device", "hall", "--session", "nope"), "no session 'nope'")):
        result = cli(tmp_path, "export", "--db", url, *args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("r2d2voice: error: ")
        assert needle in errors[0]
        assert PASSWORD not in result.stderr
        assert result.stdout == ""


def test_an_unreachable_fleet_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    with socket_port() as port:  # nothing listens there
        url = f"postgresql://r2d2:{PASSWORD}@127.0.0.1:{port}/fleet"
        result = cli(tmp_path, "stats", "--db", url)
    assert result.exit_code == 1
    assert result.stderr.startswith("r2d2voice: error: ")
    assert len(result.stderr.splitlines()) == 1
    assert PASSWORD not in result.stderr
    assert "Traceback" not in result.output


def socket_port() -> Any:
    """A context holding a loopback port that nothing accepts connections on."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held() -> Iterator[int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            yield sock.getsockname()[1]

    return held()
