"""The fleet server side of shipping, against a real PostgreSQL cluster (``pg_server``): schema
creation and migration, batched idempotent upserts from several robots, failures that leave no
partial batch and no password in sight, and the fleet read queries."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from pg import PASSWORD, PgServer

from r2d2voice.errors import ConfigError, RuntimeFailure, UsageError
from r2d2voice.storage.shipping.errors import (
    FleetRejected,
    FleetSchemaTooNew,
    FleetUnavailable,
)
from r2d2voice.storage.shipping.fleet import FleetStore, open_fleet
from r2d2voice.storage.shipping.rows import FleetMessageRow, FleetToolRow
from r2d2voice.storage.shipping.server_schema import (
    MIGRATIONS,
    SERVER_SCHEMA_VERSION,
    TABLES,
    migrate,
    server_version,
)
from r2d2voice.storage.shipping.url import is_fleet_url, parse_fleet_url

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def fleet(url: str) -> Iterator[FleetStore]:
    with open_fleet(url) as store:
        yield store


def count(pg: PgServer, db: str, table: str) -> int:
    with pg.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def assert_clean(message: str) -> None:
    """One line, no password in any spelling, no traceback."""
    assert "\n" not in message
    for spelling in (PASSWORD, quote(PASSWORD, safe="")):
        assert spelling not in message
    assert "Traceback" not in message


# ---------------------------------------------------------------------------- rows


def session(sid: str, seq: int, started: str = "2026-11-21T09:00:00.000Z", **kw: Any) -> dict:
    row = dict(id=sid, seq=seq, started_at=started, ended_at=None, backend="local",
               model="gpt-realtime", voice="marin", service_session_id=None,
               previous_session_id=None, metadata=None)
    return row | kw


def message(sid: str, seq: int, role: str = "user", text: str = "hello", **kw: Any) -> dict:
    row = dict(session_id=sid, seq=seq, role=role, text=text,
               created_at="2026-11-21T09:00:01.000Z", item_id=f"item_{seq}", response_id=None,
               interrupted=0, played_ms=None, raw_event=None, text_kept=1)
    return row | kw


def response(sid: str, rid: str, **kw: Any) -> dict:
    row = dict(session_id=sid, response_id=rid, status="completed", status_details=None,
               created_at="2026-11-21T09:00:02.000Z", done_at="2026-11-21T09:00:03.000Z",
               input_text_tokens=None, input_audio_tokens=None, input_cached_tokens=None,
               output_text_tokens=None, output_audio_tokens=None, first_audio_ms=None,
               first_played_ms=None)
    return row | kw


def error(eid: int, sid: str | None, source: str = "service", **kw: Any) -> dict:
    row = dict(id=eid, session_id=sid, at="2026-11-21T09:00:04.000Z", source=source,
               type="server_error", code=None, message="boom")
    return row | kw


def tool(sid: str, call_id: str, seq: int, **kw: Any) -> dict:
    row = dict(session_id=sid, response_id="resp_1", item_id=f"fc_{call_id}", call_id=call_id,
               seq=seq, name="turn_head", arguments='{"degrees": -90}', output="turned",
               status="ok", exit_code=0, started_at="2026-11-21T09:00:05.000Z", duration_ms=41,
               text_kept=1)
    return row | kw


# ---------------------------------------------------------------------------- schema


def test_first_connect_creates_the_schema_and_records_its_version(
    pg_server: PgServer, db: str, url: str
) -> None:
    with open_fleet(url) as fleet:
        assert fleet.schema_version == SERVER_SCHEMA_VERSION
        first_id = fleet.fleet_id
        assert fleet.where == f"127.0.0.1:{pg_server.port}/{db}"
    with open_fleet(url) as again:  # a second robot, or a restart: nothing applied twice
        assert again.fleet_id == first_id and len(first_id) == 32
    other = pg_server.create_database()
    try:
        with open_fleet(pg_server.url(other)) as elsewhere:  # another server: another id
            assert elsewhere.fleet_id != first_id
    finally:
        pg_server.drop_database(other)
    with pg_server.connect(db) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        assert versions == [(v,) for v in range(1, SERVER_SCHEMA_VERSION + 1)]
        for spec in TABLES.values():
            cols = conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = %s ORDER BY ordinal_position", (spec.name,)
            ).fetchall()
            assert tuple(c for (c,) in cols) == ("device_id", *spec.columns)


def test_robots_connecting_at_once_apply_the_schema_once(
    pg_server: PgServer, db: str, url: str
) -> None:
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def robot() -> None:
        start.wait()
        try:
            open_fleet(url).close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=robot) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert count(pg_server, db, "schema_version") == SERVER_SCHEMA_VERSION  # one row a step
    assert count(pg_server, db, "fleet") == 1


def test_a_failing_migration_leaves_the_previous_version(pg_server: PgServer, db: str,
                                                         url: str) -> None:
    target = parse_fleet_url(url)
    broken = {**MIGRATIONS, SERVER_SCHEMA_VERSION: "CREATE TABLE extra (x int); SELECT 1 / 0"}
    with pg_server.connect(db) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            migrate(conn, target, migrations=broken)
        assert server_version(conn) == SERVER_SCHEMA_VERSION  # the first step was kept
        assert conn.execute("SELECT to_regclass('extra')").fetchone() == (None,)
        fixed = {**MIGRATIONS, SERVER_SCHEMA_VERSION: "CREATE TABLE extra (x int)"}
        assert migrate(conn, target, migrations=fixed) == SERVER_SCHEMA_VERSION + 1
        assert conn.execute("SELECT to_regclass('extra')::text").fetchone() == ("extra",)
    # This code now meets a server one version ahead of it.
    with pytest.raises(FleetSchemaTooNew):
        open_fleet(url)


def test_a_server_with_a_newer_schema_is_refused(pg_server: PgServer, db: str,
                                                 url: str) -> None:
    open_fleet(url).close()
    with pg_server.connect(db) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                     (SERVER_SCHEMA_VERSION + 7,))
    with pytest.raises(FleetSchemaTooNew) as info:
        open_fleet(url)
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 3
    text = str(info.value)
    assert f"schema version {SERVER_SCHEMA_VERSION + 7}" in text
    assert f"({SERVER_SCHEMA_VERSION})" in text and "upgrade r2d2voice" in text
    assert_clean(text)


# ---------------------------------------------------------------------------- upserts


def test_two_robots_ship_into_one_server_without_mixing(fleet: FleetStore) -> None:
    # Both robots happen to use the same session and item ids: (device, id) keeps them apart.
    for device, words in (("robot-a", "left"), ("robot-b", "right")):
        assert fleet.upsert("sessions", device, [session("s1", 1)]) == 1
        assert fleet.upsert("messages", device, [message("s1", 1, text=f"{words} one"),
                                                 message("s1", 2, text=f"{words} two")]) == 2
    assert fleet.list_devices() == ["robot-a", "robot-b"]
    texts = [(m.device_id, m.text) for m in fleet.iter_messages()]
    assert texts == [("robot-a", "left one"), ("robot-a", "left two"),
                     ("robot-b", "right one"), ("robot-b", "right two")]
    only_b = [m.text for m in fleet.iter_messages(devices=["robot-b"])]
    assert only_b == ["right one", "right two"]


def test_shipping_a_batch_twice_leaves_one_copy(pg_server: PgServer, db: str,
                                                fleet: FleetStore) -> None:
    batches = {
        "sessions": [session("s1", 1), session("s2", 2)],
        "messages": [message("s1", i) for i in range(1, 51)],
        "responses": [response("s1", f"resp_{i}") for i in range(5)],
        "errors": [error(1, "s1"), error(2, None, source="local")],
        "tool_executions": [tool("s1", "call_1", 3), tool("s1", "call_2", 7)],
    }
    for _ in range(2):
        for table, rows in batches.items():
            fleet.upsert(table, "robot-a", rows)
    for table, rows in batches.items():
        assert count(pg_server, db, table) == len(rows)
    # The same key twice inside one batch: one row, the later values.
    fleet.upsert("messages", "robot-a", [message("s2", 1, text="first"),
                                         message("s2", 1, text="second")])
    assert [m.text for m in fleet.iter_messages(sessions=["s2"])] == ["second"]


def test_rows_updated_after_shipping_replace_the_server_values(fleet: FleetStore) -> None:
    fleet.upsert("sessions", "r", [session("s1", 1)])
    fleet.upsert("messages", "r", [message("s1", 1, role="assistant", text="")])
    fleet.upsert("responses", "r", [response("s1", "resp_1", status="in_progress",
                                             done_at=None)])
    # Later on the robot: the session ends, the reply was cut off, its transcript arrived,
    # the response finished with usage and failure details.
    fleet.upsert("sessions", "r", [session("s1", 1, ended_at="2026-11-21T09:30:00.000Z")])
    fleet.upsert("messages", "r", [message("s1", 1, role="assistant", text="late words",
                                           interrupted=1, played_ms=1234)])
    fleet.upsert("responses", "r", [response(
        "s1", "resp_1", status="incomplete", input_text_tokens=10, output_audio_tokens=20,
        status_details='{"type": "incomplete", "reason": "max_output_tokens"}')])
    [s] = fleet.list_sessions()
    assert s.ended_at == "2026-11-21T09:30:00.000Z"
    [m] = fleet.iter_messages()
    assert (m.text, m.interrupted, m.played_ms) == ("late words", True, 1234)
    assert fleet.response_status_counts() == {"incomplete": 1}
    [u] = fleet.usage_totals()
    assert (u.responses, u.input_text, u.output_audio) == (1, 10, 20)
    with psycopg.connect(fleet.target.conninfo) as conn:
        details = conn.execute("SELECT status_details FROM responses").fetchone()[0]
    assert details == {"type": "incomplete", "reason": "max_output_tokens"}


def test_robot_values_are_converted_faithfully(fleet: FleetStore) -> None:
    fleet.upsert("sessions", "r", [session("s1", 1, metadata="not json {",
                                           started_at="2026-11-21T09:30:00.123Z")])
    fleet.upsert("messages", "r", [
        message("s1", 1, text="", text_kept=0, played_ms=12.6),  # privacy mode: no text kept
        message("s1", 2, text="naïve 🤖 \"quoted\"\ttab\nnewline \\ back",
                created_at=datetime(2026, 11, 21, 9, 31, 0, 456000, tzinfo=timezone.utc)),
    ])
    [s] = fleet.list_sessions()
    assert s.started_at == "2026-11-21T09:30:00.123Z"
    first, second = fleet.iter_messages()
    assert (first.text, first.text_kept, first.played_ms) == ("", False, 13)
    assert second.text_kept is True
    assert second.text == "naïve 🤖 \"quoted\"\ttab\nnewline \\ back"
    assert second.created_at == "2026-11-21T09:31:00.456Z"
    with psycopg.connect(fleet.target.conninfo) as conn:
        meta = conn.execute("SELECT metadata FROM sessions").fetchone()[0]
    assert meta == "not json {"  # unreadable metadata kept as a JSON string, not refused


def test_rows_with_the_wrong_columns_are_refused_before_sending(pg_server: PgServer, db: str,
                                                                fleet: FleetStore) -> None:
    incomplete = message("s1", 1)
    del incomplete["played_ms"]
    with pytest.raises(ValueError, match=r"missing columns \['played_ms'\]"):
        fleet.upsert("messages", "r", [message("s1", 2), incomplete])
    with pytest.raises(ValueError, match=r"unknown columns \['id'\]"):
        fleet.upsert("messages", "r", [message("s1", 1) | {"id": 7}])
    with pytest.raises(ValueError, match="1 values for 11 columns"):
        fleet.upsert_values("messages", "r", [("s1",)])
    with pytest.raises(ValueError, match="unknown table"):
        fleet.upsert("audio", "r", [{}])
    with pytest.raises(ValueError, match="device_id"):
        fleet.upsert("messages", "", [message("s1", 1)])
    assert count(pg_server, db, "messages") == 0
    assert fleet.upsert("messages", "r", []) == 0


# ---------------------------------------------------------------------------- failures


def test_a_bad_row_rejects_the_whole_batch(pg_server: PgServer, db: str,
                                           fleet: FleetStore) -> None:
    rows = [message("s1", i) for i in range(1, 101)]
    rows[49] = message("s1", 50, role="robot")  # violates the role check on the server
    with pytest.raises(FleetRejected) as info:
        fleet.upsert("messages", "r", rows)
    assert isinstance(info.value, RuntimeFailure) and info.value.exit_code == 1
    assert "messages_role_check" in str(info.value)
    assert_clean(str(info.value))
    assert count(pg_server, db, "messages") == 0
    rows[49] = message("s1", 50)
    assert fleet.upsert("messages", "r", rows) == 100  # the same connection goes on
    assert count(pg_server, db, "messages") == 100


def test_a_connection_killed_mid_batch_leaves_nothing_then_ships_once(
    pg_server: PgServer, db: str, url: str
) -> None:
    with open_fleet(url) as fleet:
        pass  # schema in place
    with pg_server.connect(db) as conn:  # the server drops the robot at row 600 of 1000
        conn.execute(
            "CREATE FUNCTION drop_robot() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.seq = 600 THEN PERFORM pg_terminate_backend(pg_backend_pid());"
            " END IF; RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER drop_robot BEFORE INSERT ON messages"
                     " FOR EACH ROW EXECUTE FUNCTION drop_robot()")
    rows = [message("s1", i) for i in range(1, 1001)]
    fleet = open_fleet(url)
    with pytest.raises(FleetUnavailable) as info:
        fleet.upsert("messages", "r", rows)
    assert_clean(str(info.value))
    assert fleet.closed
    assert count(pg_server, db, "messages") == 0
    with pg_server.connect(db) as conn:
        conn.execute("DROP TRIGGER drop_robot ON messages")
    with open_fleet(url) as fleet:  # the shipper reconnects and sends the batch again
        assert fleet.upsert("messages", "r", rows) == 1000
    assert count(pg_server, db, "messages") == 1000


def test_a_stopped_server_fails_cleanly_and_shipping_resumes(pg_server: PgServer, db: str,
                                                             url: str) -> None:
    fleet = open_fleet(url)
    fleet.upsert("messages", "r", [message("s1", 1)])
    pg_server.stop()
    try:
        with pytest.raises(FleetUnavailable) as during:
            fleet.upsert("messages", "r", [message("s1", 2)])
        assert fleet.closed
        with pytest.raises(FleetUnavailable) as reconnect:
            open_fleet(url)
    finally:
        pg_server.start()
    for exc in (during.value, reconnect.value):
        assert isinstance(exc, RuntimeFailure) and exc.exit_code == 1
        assert_clean(str(exc))
        assert f"127.0.0.1:{pg_server.port}/{db}" in str(exc)
    assert "Connection refused" in str(reconnect.value)
    with open_fleet(url) as fleet:
        fleet.upsert("messages", "r", [message("s1", 2)])
    assert count(pg_server, db, "messages") == 2


def test_a_wrong_password_is_one_clean_line_and_no_log_has_a_password(
    pg_server: PgServer, db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # psycopg's own debug records included
    open_fleet(pg_server.url(db)).close()
    wrong = "Wr0ng-" + PASSWORD
    with pytest.raises(FleetUnavailable) as info:
        open_fleet(pg_server.url(db, password=wrong))
    text = str(info.value)
    assert "password authentication failed" in text
    assert wrong not in text and "***" in text
    assert_clean(text)
    assert f"127.0.0.1:{pg_server.port}/{db}" in caplog.text  # the success was logged
    assert PASSWORD not in caplog.text and quote(PASSWORD, safe="") not in caplog.text


def test_credentials_from_pgpassfile_and_pgservice(pg_server: PgServer, db: str,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    passfile = tmp_path / "pgpass"
    escaped = PASSWORD.replace("\\", "\\\\").replace(":", "\\:")  # pgpass syntax
    passfile.write_text(f"127.0.0.1:{pg_server.port}:{db}:r2d2:{escaped}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with open_fleet(pg_server.url(db, password=None)) as fleet:
        assert fleet.upsert("sessions", "r", [session("s1", 1)]) == 1
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[fleet]\nhost=127.0.0.1\nport={pg_server.port}\ndbname={db}\n"
                        "user=r2d2\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    with open_fleet("postgresql:///?service=fleet") as fleet:
        assert [s.id for s in fleet.list_sessions()] == ["s1"]
    monkeypatch.setenv("PGSERVICE", "fleet")
    with open_fleet("postgresql://") as fleet:
        assert fleet.list_devices() == ["r"]


def test_connection_strings_never_show_the_password() -> None:
    cases = {
        f"postgresql://r2d2:{quote(PASSWORD, safe='')}@db.example:5432/fleet":
            "postgresql://r2d2:***@db.example:5432/fleet",
        "postgres://u:pw@h/d?sslmode=require&password=other":
            "postgres://u:***@h/d?sslmode=require&password=***",
        f"host=h user=u password='{PASSWORD}' dbname=d": "host=h user=u password=*** dbname=d",
        "postgresql:///?service=fleet": "postgresql:///?service=fleet",
    }
    for text, shown in cases.items():
        target = parse_fleet_url(text)
        assert target.display == shown == str(target)
        assert PASSWORD not in repr(target)
        assert is_fleet_url(text) == text.startswith("postgres")
    assert not is_fleet_url("/var/lib/r2d2voice/r2d2voice.db")
    with pytest.raises(UsageError) as info:
        parse_fleet_url(f"host=h password={PASSWORD} oops")
    assert "missing \"=\" after \"oops\"" in str(info.value)
    assert_clean(str(info.value))


# ---------------------------------------------------------------------------- reads


def _ship_two_robots(fleet: FleetStore) -> None:
    """robot-a: the clock stepped back between its sessions and mid-conversation, so the
    labels disagree with conversation order; robot-b: a plain session."""
    fleet.upsert("sessions", "robot-a", [
        session("a1", 1, "2026-11-24T10:00:00.000Z", metadata='{"stats": {"dropped": 2}}'),
        session("a2", 2, "2026-11-24T09:00:00.000Z", previous_session_id="a1"),
    ])
    fleet.upsert("messages", "robot-a", [
        message("a1", 1, text="a1 hello", created_at="2026-11-24T10:00:01.000Z"),
        message("a1", 2, "assistant", "a1 reply", created_at="2026-11-24T10:00:02.000Z",
                response_id="ra1", interrupted=1, played_ms=500),
        message("a1", 4, text="a1 after the tool", created_at="2026-11-24T09:00:30.000Z"),
        message("a2", 1, text="a2 hello", created_at="2026-11-24T09:01:00.000Z"),
    ])
    fleet.upsert("tool_executions", "robot-a", [tool("a1", "call_1", 3)])
    fleet.upsert("responses", "robot-a", [
        response("a1", "ra1", created_at="2026-11-24T10:00:02.000Z", input_text_tokens=100,
                 input_audio_tokens=300, input_cached_tokens=200, output_audio_tokens=50,
                 first_audio_ms=420, first_played_ms=480),
        response("a2", "ra2", status="failed", created_at="2026-11-24T09:01:01.000Z",
                 first_audio_ms=300),
    ])
    fleet.upsert("errors", "robot-a", [error(1, "a1"), error(2, None, source="local")])
    fleet.upsert("sessions", "robot-b", [session("b1", 1, "2026-11-25T08:00:00.000Z")])
    fleet.upsert("messages", "robot-b", [
        message("b1", 1, text="b1 hello", created_at="2026-11-25T08:00:01.000Z"),
    ])
    fleet.upsert("responses", "robot-b", [
        response("b1", "rb1", created_at="2026-11-25T08:00:02.000Z", input_text_tokens=7,
                 output_text_tokens=3, first_audio_ms=900),
    ])
    fleet.upsert("errors", "robot-b", [error(1, "b1")])


def test_messages_come_back_in_conversation_order_filtered(fleet: FleetStore) -> None:
    _ship_two_robots(fleet)
    texts = [m.text for m in fleet.iter_messages()]
    assert texts == ["a1 hello", "a1 reply", "a1 after the tool", "a2 hello", "b1 hello"]
    both = list(fleet.iter_messages(devices=["robot-a"], tools=True))
    assert [(r.role, r.seq) for r in both] == [
        ("user", 1), ("assistant", 2), ("tool", 3), ("user", 4), ("user", 1)]
    call = both[2]
    assert isinstance(call, FleetToolRow)
    assert (call.device_id, call.call_id, call.name, call.status, call.duration_ms) == (
        "robot-a", "call_1", "turn_head", "ok", 41)
    reply = both[1]
    assert reply == FleetMessageRow("robot-a", "a1", 2, "assistant", "a1 reply",
                                    "2026-11-24T10:00:02.000Z", "item_2", "ra1", True, 500)
    assert [m.text for m in fleet.iter_messages(devices=["robot-b"])] == ["b1 hello"]
    assert [m.text for m in fleet.iter_messages(sessions=["a2", "b1"])] == [
        "a2 hello", "b1 hello"]
    assert [m.text for m in fleet.iter_messages(role="assistant")] == ["a1 reply"]
    assert [r.role for r in fleet.iter_messages(role="tool", tools=True)] == ["tool"]
    since = datetime(2026, 11, 24, 9, 30, tzinfo=timezone.utc)
    until = datetime(2026, 11, 25, tzinfo=timezone.utc)
    assert [m.text for m in fleet.iter_messages(since=since, until=until)] == [
        "a1 hello", "a1 reply"]
    with pytest.raises(ValueError, match="role"):
        list(fleet.iter_messages(role="robot"))
    # A reader that stops early leaves no transaction open: the next batch is committed.
    rows = fleet.iter_messages()
    next(rows)
    rows.close()
    fleet.upsert("messages", "robot-b", [message("b1", 2, text="b1 again")])
    with psycopg.connect(fleet.target.conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (6,)


def test_fleet_reports_per_device(fleet: FleetStore) -> None:
    _ship_two_robots(fleet)
    sessions = fleet.list_sessions()
    assert [(s.device_id, s.id, s.turns, s.messages) for s in sessions] == [
        ("robot-a", "a1", 2, 3), ("robot-a", "a2", 1, 1), ("robot-b", "b1", 1, 1)]
    assert sessions[1].previous_session_id == "a1"
    assert [s.id for s in fleet.list_sessions(devices=["robot-b"])] == ["b1"]

    by_day = fleet.usage_summary("day")
    assert [(r.device_id, r.key, r.responses, r.input_text, r.input_cached) for r in by_day] == [
        ("robot-a", "2026-11-24", 2, 100, 200), ("robot-b", "2026-11-25", 1, 7, 0)]
    assert (by_day[0].cached_text_est, by_day[0].cached_audio_est) == (50.0, 150.0)
    by_session = fleet.usage_summary("session", devices=["robot-a"])
    assert [(r.key, r.responses, r.output_audio) for r in by_session] == [
        ("a1", 1, 50), ("a2", 1, 0)]
    assert [(u.device_id, u.session_id, u.input_total) for u in fleet.usage_totals()] == [
        ("robot-a", "a1", 400), ("robot-a", "a2", 0), ("robot-b", "b1", 7)]

    assert fleet.response_latencies() == ([300, 420, 900], [480])
    assert fleet.response_latencies(devices=["robot-b"]) == ([900], [])
    assert fleet.response_status_counts() == {"completed": 2, "failed": 1}
    assert fleet.response_status_counts(devices=["robot-a"], sessions=["a2"]) == {"failed": 1}
    assert fleet.count_interrupted() == 1
    assert fleet.count_interrupted(devices=["robot-b"]) == 0
    assert fleet.count_errors() == {"service": 2, "local": 1}
    assert fleet.count_errors(devices=["robot-a"], sessions=["a1"]) == {"service": 1, "local": 0}
    assert fleet.tool_call_counts() == {("turn_head", "ok"): 1}
    stats = fleet.session_stats(devices=["robot-a"])
    assert [(s.session_id, s.stats) for s in stats] == [("a1", {"dropped": 2}), ("a2", None)]
    errors = fleet.list_errors(devices=["robot-b"])
    assert [(e.device_id, e.session_id, e.source, e.at) for e in errors] == [
        ("robot-b", "b1", "service", "2026-11-21T09:00:04.000Z")]
