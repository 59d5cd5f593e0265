"""The robot's side of shipping against a real PostgreSQL server (``pg_server``): real robot
databases written as a run writes them, shipped by ``ship_once`` / ``ship_command``, read back
from both sides and compared row for row."""

from __future__ import annotations

import contextlib
import io
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from pg import PASSWORD, PgServer
from shipping_support import converse, counts, interrupt, local_rows, record, server_rows
from storage_support import T0, SteppedClock
from support import ROOT, clean_env

from r2d2voice.errors import ConfigError, RuntimeFailure, UsageError
from r2d2voice.protocol.actions import StoreMessage, StoreResponse
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.database import Store
from r2d2voice.storage.retention import prune
from r2d2voice.storage.shipping.command import ship_command
from r2d2voice.storage.shipping.errors import FleetUnavailable
from r2d2voice.storage.shipping.local import (
    SHIPPED_TABLES,
    ensure_ship_log,
    is_shipped,
    log_marks,
    migrate_ship_log,
    shipped_sessions,
    watermarks,
)
from r2d2voice.storage.shipping.shipper import ship_once


def assert_clean(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert PASSWORD not in message and quote(PASSWORD, safe="") not in message


def log_sizes(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM ship_log_{t}").fetchone()[0]
                for t in SHIPPED_TABLES}
    finally:
        conn.close()


# ---------------------------------------------------------------------------- shipping


def test_two_robots_ship_to_one_server(pg_server: PgServer, db: str, url: str,
                                       tmp_path: Path) -> None:
    kitchen, hall = tmp_path / "kitchen.db", tmp_path / "hall.db"
    with Store.open(kitchen) as store:
        first = converse(store)
        converse(store, previous=first)
    with Store.open(hall, store_text=False) as store:  # privacy mode: no text, no arguments
        converse(store, turns=1)
    report = ship_once(kitchen, url, "r2-kitchen")
    assert str(report) == (
        "shipped 2 sessions, 8 messages, 4 responses, 2 tool executions, 2 errors"
        f" to 127.0.0.1:{pg_server.port}/{db} as device 'r2-kitchen'")
    assert report.armed and report.complete
    ship_once(hall, url, "r2-hall")
    assert server_rows(pg_server, db, "r2-kitchen") == local_rows(kitchen)
    assert server_rows(pg_server, db, "r2-hall") == local_rows(hall)
    assert counts(pg_server, db) == {"sessions": 3, "messages": 10, "responses": 5,
                                     "tool_executions": 3, "errors": 3, "facts": 0,
                                     "recall_exclusions": 0}
    with pg_server.connect(db) as conn:
        kept = conn.execute("SELECT device_id, bool_and(text_kept), max(text) FROM messages"
                            " GROUP BY 1 ORDER BY 1").fetchall()
        args = conn.execute("SELECT device_id, arguments FROM tool_executions"
                            " WHERE device_id = 'r2-hall'").fetchall()
    assert kept == [("r2-hall", False, ""), ("r2-kitchen", True, "hello 1")]
    assert args == [("r2-hall", None)]


def test_ship_twice_then_more_conversation_ships_only_the_new_rows(
    pg_server: PgServer, db: str, url: str, tmp_path: Path
) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store)
    assert ship_once(path, url, "r2").total == 9
    again = ship_once(path, url, "r2")
    assert (again.total, again.armed) == (0, False)
    assert str(again).startswith("nothing new to ship to 127.0.0.1:")
    assert counts(pg_server, db)["messages"] == 4
    with Store.open(path) as store:
        converse(store, turns=3, tool=False, error=False)
    report = ship_once(path, url, "r2")
    assert report.rows == {"sessions": 1, "messages": 6, "responses": 3,
                           "tool_executions": 0, "errors": 0, "facts": 0,
                           "recall_exclusions": 0}
    assert server_rows(pg_server, db, "r2") == local_rows(path)
    # The change log keeps at most the last shipped entry of each table.
    assert all(n <= 1 for n in log_sizes(path).values())


def test_rows_updated_after_shipping_reach_the_server(pg_server: PgServer, db: str,
                                                      url: str, tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        sid = converse(store, turns=1, tool=False, error=False, end=False)
        record(store, sid, [
            StoreMessage("assistant", "a1", 4, "I was say", response_id="r1"),
            StoreResponse("r1", "in_progress"),
            StoreToolCall("call_9", "fc_9", "r1", 5, "lights", '{"on": true}'),
        ])
    ship_once(path, url, "r2")
    with pg_server.connect(db) as conn:
        assert conn.execute("SELECT ended_at FROM sessions").fetchone() == (None,)
    with Store.open(path) as store:  # after the ship: what a run writes later
        interrupt(store, sid, "a1", 4, played_ms=640)
        record(store, sid, [
            StoreMessage("user", "u1", 3, "late transcript"),  # arrives after the reply
            StoreResponse("r1", "cancelled"),
            StoreToolResult("call_9", "timeout", "too slow", None, 5001.0),
        ])
        store.write.end_session(sid)
    report = ship_once(path, url, "r2")
    assert report.rows == {"sessions": 1, "messages": 2, "responses": 1,
                           "tool_executions": 1, "errors": 0, "facts": 0,
                           "recall_exclusions": 0}
    assert server_rows(pg_server, db, "r2") == local_rows(path)
    with pg_server.connect(db) as conn:
        assert conn.execute("SELECT ended_at IS NOT NULL FROM sessions").fetchone() == (True,)
        assert conn.execute("SELECT text, interrupted, played_ms FROM messages"
                            " WHERE item_id = 'a1'").fetchone() == ("I was say", True, 640)
        assert conn.execute("SELECT text FROM messages WHERE item_id = 'u1'").fetchone() == (
            "late transcript",)
        assert conn.execute("SELECT status, output, duration_ms FROM tool_executions"
                            ).fetchone() == ("timeout", "too slow", 5001)
        assert conn.execute("SELECT status, done_at IS NOT NULL FROM responses"
                            " WHERE response_id = 'r1'").fetchone() == ("cancelled", True)


def test_a_stopped_server_fails_cleanly_and_nothing_is_lost(pg_server: PgServer, db: str,
                                                            url: str, tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store)
    ship_once(path, url, "r2")
    with Store.open(path) as store:
        later = converse(store, word="while the server was down")
    pg_server.stop()
    try:
        with pytest.raises(FleetUnavailable) as info:
            ship_once(path, url, "r2")
        out = io.StringIO()
        with pytest.raises(RuntimeFailure) as cli:
            ship_command(path, url, device_id="r2", out=out)
    finally:
        pg_server.start()
    for exc in (info.value, cli.value):
        assert exc.exit_code == 1
        assert_clean(str(exc))
        assert f"127.0.0.1:{pg_server.port}/{db}" in str(exc)
    assert out.getvalue() == ""
    with Store.open(path) as store:
        assert not is_shipped(store.conn, later)
    report = ship_once(path, url, "r2")
    assert (report.rows["sessions"], report.rows["messages"]) == (1, 4)
    assert server_rows(pg_server, db, "r2") == local_rows(path)
    with Store.open(path) as store:
        assert is_shipped(store.conn, later)


def test_a_ship_killed_mid_batch_and_restarted_leaves_exactly_one_copy(
    pg_server: PgServer, db: str, url: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.db"
    total = 40_000
    with Store.open(path) as store:
        sid = store.write.start_session(backend="local", model="m", voice=None)
        with store.write.batch():
            for n in range(total):
                store.write.upsert_message(sid, role=("user", "assistant")[n % 2],
                                           item_id=f"i{n}", seq=n + 1, text=f"message {n}")
    code = (f"from r2d2voice.storage.shipping.shipper import ship_once;"
            f" ship_once({str(path)!r}, {url!r}, 'r2', batch=500)")
    child = subprocess.Popen([sys.executable, "-c", code], env=clean_env(), cwd=ROOT)
    try:
        with pg_server.connect(db) as conn:
            deadline = time.monotonic() + 60
            shipped = 0
            while not 0 < shipped < total and time.monotonic() < deadline:
                time.sleep(0.005)
                with contextlib.suppress(psycopg.errors.UndefinedTable):  # no schema yet
                    shipped = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert 0 < shipped < total, "the ship was not caught in the middle"
    with Store.open(path) as store:  # one log entry per message, in id order
        done = watermarks(store.conn)["messages"]
        assert log_marks(store.conn)["messages"] == total
    assert shipped - 500 <= done < total  # at most the batch in flight was not recorded
    report = ship_once(path, url, "r2")
    assert not report.armed and report.rows["messages"] == total - done
    assert counts(pg_server, db)["messages"] == total
    assert server_rows(pg_server, db, "r2") == local_rows(path)


def test_a_new_server_or_device_id_gets_everything(pg_server: PgServer, db: str, url: str,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store)
    ship_once(path, url, "r2")
    other = pg_server.create_database()  # a new (or rebuilt) fleet server
    try:
        report = ship_once(path, pg_server.url(other), "r2")
        assert report.armed and report.total == 9
        assert server_rows(pg_server, other, "r2") == local_rows(path)
    finally:
        pg_server.drop_database(other)
    back = ship_once(path, url, "r2")  # the first server again: everything again, one copy
    assert back.armed and back.total == 9
    renamed = ship_once(path, url, "r2-renamed")
    assert renamed.armed and renamed.total == 9
    assert counts(pg_server, db)["messages"] == 8  # 4 as "r2", 4 as "r2-renamed"
    assert server_rows(pg_server, db, "r2-renamed") == local_rows(path)


# ---------------------------------------------------------------------------- the local side


def test_nothing_is_logged_until_the_first_ship(tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        ensure_ship_log(store.conn)
        converse(store)
        assert log_sizes(path) == dict.fromkeys(SHIPPED_TABLES, 0)
        assert shipped_sessions(store.conn, ["x"]) == set()


def test_the_migration_is_idempotent_inside_a_transaction(tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        conn = store.conn
        for _ in range(2):
            conn.execute("BEGIN IMMEDIATE")
            migrate_ship_log(conn)
            conn.execute("COMMIT")
        names = {n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE 'ship%'")}
    assert {"ship_target", "ship_state"} <= names
    assert {f"ship_log_{t}_{e}" for t in SHIPPED_TABLES for e in ("insert", "update")} <= names
    foreign = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        migrate_ship_log(foreign)  # not an r2d2voice database: nothing created
    assert foreign.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    foreign.close()


def test_retention_prunes_only_what_the_server_has(pg_server: PgServer, url: str,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    clock = SteppedClock()
    with Store.open(path, now=clock) as store:
        old_shipped = converse(store)
        old_unended = converse(store, end=False)
        ship_once(path, url, "r2")
        store.write.end_session(old_unended)  # ended after the ship: its end is not shipped
        old_unshipped = converse(store)
        clock.step(days=40)
        recent = converse(store)
        # The second old session's end and the third session wait for the next ship.
        assert set(shipped_sessions(store.conn, [old_shipped, old_unended, old_unshipped,
                                                 recent])) == {old_shipped}
        result = prune(store.conn, T0 + timedelta(days=30), shipped_sessions)
        assert (result.sessions, result.unshipped) == (1, 2)
        left = {sid for (sid,) in store.conn.execute("SELECT id FROM sessions")}
        assert left == {old_unended, old_unshipped, recent}
    ship_once(path, url, "r2")
    with Store.open(path, now=clock) as store:
        result = prune(store.conn, T0 + timedelta(days=30), shipped_sessions)
        assert (result.sessions, result.unshipped) == (2, 0)
        assert [sid for (sid,) in store.conn.execute("SELECT id FROM sessions")] == [recent]


# ---------------------------------------------------------------------------- the command


def test_ship_command_prints_what_it_shipped_and_refuses_bad_input(
    pg_server: PgServer, db: str, url: str, tmp_path: Path
) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store, turns=1, tool=False, error=False)
    out = io.StringIO()
    ship_command(path, url, device_id="r2-kitchen", out=out)
    assert out.getvalue() == (
        "shipped 1 session, 2 messages, 1 response, 0 tool executions, 0 errors"
        f" to 127.0.0.1:{pg_server.port}/{db} as device 'r2-kitchen'\n")
    with pytest.raises(UsageError, match="no such database"):
        ship_command(tmp_path / "missing.db", url, device_id="r2")
    assert not (tmp_path / "missing.db").exists()
    # the fleet URL is a setting (R2D2_SHIP_URL, --to): a bad one is exit 3, as the CLI's check
    with pytest.raises(ConfigError, match="postgresql:// URL"):
        ship_command(path, "mysql://h/db", device_id="r2")
    with pytest.raises(ConfigError, match="invalid URI query parameter") as bad_url:
        ship_command(path, "postgresql://h/db?foo=bar", device_id="r2")
    assert bad_url.value.exit_code == 3
    with pytest.raises(ConfigError) as bad_id:
        ship_command(path, url, device_id="two words")
    assert bad_id.value.exit_code == 3 and "R2D2_DEVICE_ID" in str(bad_id.value)


def test_ship_follow_keeps_shipping_until_sigterm(pg_server: PgServer, db: str, url: str,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path) as store:
        converse(store, turns=1, tool=False, error=False)
    code = ("import sys; from r2d2voice.storage.shipping.command import ship_command;"
            f" ship_command({str(path)!r}, {url!r}, True, 'r2', sys.stdout, every=0.05)")
    child = subprocess.Popen([sys.executable, "-c", code], env=clean_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        first = child.stdout.readline()
        assert first.startswith("shipped 1 session, 2 messages, 1 response")
        with Store.open(path) as store:
            converse(store, turns=2, tool=False, error=False)
        second = child.stdout.readline()
        assert second.startswith("shipped 1 session, 4 messages, 2 responses")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "Traceback" not in err
    assert server_rows(pg_server, db, "r2") == local_rows(path)
