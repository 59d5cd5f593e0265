"""``r2d2voice memory list | search | forget | add`` for the robot's owner: on the robot's own
database, and (list, search) on a fleet server the robots shipped their memory to (a real
PostgreSQL server, the real shipper)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pg import PgServer
from shipping_support import local_rows, server_rows

from r2d2voice.cli.main import main
from r2d2voice.storage.database import Store
from r2d2voice.storage.memory import remember
from r2d2voice.storage.shipping.server_schema import (
    MIGRATIONS,
    SERVER_SCHEMA_VERSION,
    migrate,
    server_version,
)
from r2d2voice.storage.shipping.shipper import ship_once
from r2d2voice.storage.shipping.url import parse_fleet_url

NOW = datetime.now(timezone.utc)


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """``r2d2voice`` in-process, with an empty env file."""
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args], env=env)


def ok(tmp_path: Path, *args: str) -> str:
    result = cli(tmp_path, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def error(result: Result) -> str:
    """The last stderr line (one line, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2d2voice: error: "), result.stderr
    return lines[0].removeprefix("r2d2voice: error: ")


def robot(path: Path, *said: str) -> str:
    """A robot database with one conversation of ``said`` (user, assistant, …)."""
    with Store.open(path) as s:
        sid = s.write.start_session(backend="local", model="m", voice=None)
        for seq, text in enumerate(said, 1):
            s.write.upsert_message(sid, role="user" if seq % 2 else "assistant",
                                   item_id=f"i{seq}", seq=seq, text=text)
        return sid


def test_the_owner_adds_lists_searches_and_forgets(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    robot(db, "Our dog Biscuit chewed the sofa", "Naughty Biscuit!", "Anna loves cycling")
    day = datetime.now().astimezone().date().isoformat()
    assert ok(tmp_path, "memory", "list", "--db", str(db)) == f"no facts remembered in {db}\n"
    assert ok(tmp_path, "memory", "add", "The dog is called Biscuit.", "--db", str(db)) == (
        "remembered #1: The dog is called Biscuit.\n")
    assert ok(tmp_path, "memory", "add", "the dog is called biscuit", "--db", str(db)) == (
        "already remembered as #1: The dog is called Biscuit.\n")
    with Store.open(db) as s:
        remember(s.conn, "Anna's birthday is 3 May.", source="conversation", now=NOW)
    assert ok(tmp_path, "memory", "list", "--db", str(db)).splitlines() == [
        f"2 facts remembered in {db} (newest first):",
        f"#2  {day}  Anna's birthday is 3 May.",
        f"#1  {day}  The dog is called Biscuit.  (added by the owner)"]
    text = ok(tmp_path, "memory", "search", "biscuit", "--db", str(db)).splitlines()
    assert text == ["facts:", f"  #1  {day}  The dog is called Biscuit.  (added by the owner)",
                    "conversations:", f"  {day}  assistant  Naughty Biscuit!",
                    f"  {day}  user       Our dog Biscuit chewed the sofa"]
    found = json.loads(ok(tmp_path, "memory", "search", "Anna", "--db", str(db),
                          "--format", "json"))
    assert found == {"facts": [{"id": 2, "day": day, "fact": "Anna's birthday is 3 May.",
                                "source": "conversation"}],
                     "conversations": [{"day": day, "who": "user",
                                        "words": "Anna loves cycling"}]}
    assert ok(tmp_path, "memory", "forget", "Biscuit", "--db", str(db)).splitlines() == [
        "forgot 1 fact: #1 The dog is called Biscuit.",
        "2 passages of past conversations no longer recalled (the record keeps them)"]
    assert ok(tmp_path, "memory", "search", "biscuit", "--db", str(db)) == (
        "nothing remembered or said matches 'biscuit'\n")
    assert ok(tmp_path, "memory", "forget", "Biscuit", "--db", str(db)) == (
        "nothing remembered or said holds every word of 'Biscuit'\n")
    exported = ok(tmp_path, "export", "--db", str(db))
    assert "Naughty Biscuit!" in exported  # the record keeps what was said
    assert json.loads(ok(tmp_path, "memory", "list", "--db", str(db), "--format", "json")) == {
        "facts": [{"id": 2, "day": day, "fact": "Anna's birthday is 3 May.",
                   "source": "conversation"}]}


def test_add_creates_the_database_the_robot_will_use(tmp_path: Path) -> None:
    db = tmp_path / "state" / "r2.db"
    assert ok(tmp_path, "memory", "add", "Sam is allergic to nuts.", "--db", str(db))
    assert "Sam is allergic to nuts." in ok(tmp_path, "memory", "list", "--db", str(db))


@pytest.mark.parametrize(("args", "code", "message"), [
    (("memory", "list", "--db", "{tmp}/nope.db"), 2, "no such database: {tmp}/nope.db"),
    (("memory", "search", "x", "--db", "{tmp}/nope.db"), 2, "no such database: {tmp}/nope.db"),
    (("memory", "forget", "x", "--db", "{tmp}/nope.db"), 2, "no such database: {tmp}/nope.db"),
    (("memory", "search", "?!", "--db", "{tmp}/r2.db"), 2,
     "memory search: '?!' has no words to look for"),
    (("memory", "forget", "...", "--db", "{tmp}/r2.db"), 2, "memory forget: '...' has no words"),
    (("memory", "add", "x" * 501, "--db", "{tmp}/r2.db"), 2,
     "memory add: a fact is at most 500 characters, this one 501"),
    (("memory", "add", " ", "--db", "{tmp}/r2.db"), 2, "memory add: the fact is empty"),
    (("memory", "forget", "x", "--db", "postgresql://r2@127.0.0.1:1/fleet"), 2,
     "memory forget changes this robot's database; a fleet server (--db postgresql://…) is "
     "only read (list, search)"),
    (("memory", "list", "--db", "{tmp}/r2.db", "--device", "hall"), 2,
     "--device selects robots of a fleet database: use it with --db postgresql://…"),
    (("memory", "list", "--db", "{tmp}/notes.txt"), 2,
     "{tmp}/notes.txt is not an r2d2voice database"),
])
def test_bad_invocations_are_one_line_with_their_exit_code(
        tmp_path: Path, args: tuple[str, ...], code: int, message: str) -> None:
    robot(tmp_path / "r2.db", "hello")
    (tmp_path / "notes.txt").write_text("not a database\n")
    result = cli(tmp_path, *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == code, result.output
    assert error(result) == message.format(tmp=tmp_path)


def test_privacy_mode_keeps_no_fact(tmp_path: Path) -> None:
    result = cli(tmp_path, "memory", "add", "a secret", "--db", str(tmp_path / "r2.db"),
                 env={"R2D2_STORE_TEXT": "false"})
    assert result.exit_code == 3
    assert error(result) == ("memory add: R2D2_STORE_TEXT is false in the environment (privacy "
                             "mode): no memory is kept")
    assert not (tmp_path / "r2.db").exists()


# ---------------------------------------------------------------------------- the fleet


def test_facts_and_forgetting_ship_and_the_fleet_is_searched_per_robot(
        pg_server: PgServer, db: str, url: str, tmp_path: Path) -> None:
    kitchen, hall = tmp_path / "kitchen.db", tmp_path / "hall.db"
    robot(kitchen, "The kettle is broken", "I will remember the kettle")
    robot(hall, "The kettle in the hall is new", "Lovely kettle")
    for path, fact in ((kitchen, "The kettle needs fixing."), (hall, "The hall has a kettle.")):
        with Store.open(path) as s:
            remember(s.conn, fact, source="conversation", now=NOW)
    report = ship_once(kitchen, url, "kitchen")
    assert (report.rows["facts"], str(report).endswith("as device 'kitchen'")) == (1, True)
    assert ", 1 fact to " in str(report)
    ship_once(hall, url, "hall")
    day = datetime.now().astimezone().date().isoformat()
    listed = ok(tmp_path, "memory", "list", "--db", url).splitlines()
    assert listed[1:] == [f"hall  #1  {day}  The hall has a kettle.",
                          f"kitchen  #1  {day}  The kettle needs fixing."]
    found = json.loads(ok(tmp_path, "memory", "search", "kettle broken", "--db", url,
                          "--device", "kitchen", "--format", "json"))
    assert found["facts"] == [{"device_id": "kitchen", "id": 1, "day": day,
                               "fact": "The kettle needs fixing.", "source": "conversation"}]
    assert [c["words"] for c in found["conversations"]] == [
        "The kettle is broken", "I will remember the kettle"]
    assert {c["device_id"] for c in found["conversations"]} == {"kitchen"}
    # the kitchen forgets the kettle; the next ship tells the server
    assert ok(tmp_path, "memory", "forget", "kettle", "--db", str(kitchen))
    report = ship_once(kitchen, url, "kitchen")
    assert (report.rows["facts"], report.rows["recall_exclusions"]) == (1, 2)
    assert server_rows(pg_server, db, "kitchen") == local_rows(kitchen)
    after = ok(tmp_path, "memory", "search", "kettle", "--db", url).splitlines()
    assert after[:3] == ["facts:", f"  hall  #1  {day}  The hall has a kettle.",
                         "conversations:"]
    assert sorted(after[3:]) == [f"  hall  {day}  assistant  Lovely kettle",  # equally good
                                 f"  hall  {day}  user       The kettle in the hall is new"]
    result = cli(tmp_path, "memory", "list", "--db", url, "--device", "attic")
    assert result.exit_code == 2
    assert error(result).startswith("--device: no robot 'attic' on ")


def test_a_v2_fleet_server_gains_the_memory_and_finds_what_it_held(
        pg_server: PgServer, db: str, url: str, tmp_path: Path) -> None:
    with pg_server.connect(db) as conn:
        assert migrate(conn, parse_fleet_url(url),
                       migrations={0: MIGRATIONS[0], 1: MIGRATIONS[1]}) == 2
        conn.execute("INSERT INTO sessions (device_id, id, seq, started_at, backend, model)"
                     " VALUES ('hall', 'S1', 1, now(), 'openai', 'gpt')")
        conn.execute("INSERT INTO messages (device_id, session_id, seq, role, text, created_at,"
                     " item_id) VALUES ('hall', 'S1', 1, 'user', 'the piano needs tuning',"
                     " now(), 'u1')")
        conn.commit()
    # reading migrates it forward (v3: facts, recall exclusions, the text search index)
    found = json.loads(ok(tmp_path, "memory", "search", "piano", "--db", url,
                          "--format", "json"))
    assert [c["words"] for c in found["conversations"]] == ["the piano needs tuning"]
    with pg_server.connect(db) as conn:
        assert server_version(conn) == SERVER_SCHEMA_VERSION == 3
        assert conn.execute("SELECT to_regclass('messages_text_search')::text").fetchone() == (
            "messages_text_search",)
    kitchen = tmp_path / "kitchen.db"
    robot(kitchen, "hello")
    with Store.open(kitchen) as s:
        remember(s.conn, "The piano is in the hall.", source="owner", now=NOW)
    assert ship_once(kitchen, url, "kitchen").rows["facts"] == 1
    assert "The piano is in the hall." in ok(tmp_path, "memory", "list", "--db", url)
