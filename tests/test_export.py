"""Exports: faithful JSONL / CSV / Markdown, filters, and refusal of bad input."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from r2d2voice.errors import UsageError
from r2d2voice.reports.export import COLUMNS, format_sessions, run_export
from r2d2voice.storage.store import Store

T0 = datetime(2025, 11, 21, 9, 30, 0, tzinfo=timezone.utc)

AWKWARD = [
    'He said "hi", then left',
    "two\nlines",
    "windows\r\nline end",
    "🤖 beep ✨ — naïve café",
    "=1+1",
    "+x",
    "-x",
    "@x",
    "\tleading tab",
    "\rleading cr",
    "'already quoted",
    "# not a heading\n- not a list\n\n    indented, after a blank line",
    "sep\u2028arators\x85too",
    "",
]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def export(db: Path, **kw) -> tuple[int, str]:
    out = io.StringIO(newline="")
    n = run_export(db, out=out, **kw)
    return n, out.getvalue()


@pytest.fixture
def awkward_db(tmp_path: Path) -> tuple[Path, str]:
    db = tmp_path / "r2.db"
    with Store.open(db) as s:
        sid = s.start_session(backend="local", model="gpt-realtime", voice="ash",
                              started_at=T0)  # fmt: skip
        for i, text in enumerate(AWKWARD):
            s.upsert_message(sid, role="user" if i % 2 == 0 else "assistant", item_id=f"item{i}",
                             text=text, response_id=None if i % 2 == 0 else f"resp{i}",
                             created_at=at(i + 1))  # fmt: skip
        s.mark_interrupted(sid, "item1", 1234)
        s.end_session(sid, at(100))
    return db, sid


@pytest.fixture
def three_days(tmp_path: Path) -> tuple[Path, list[str]]:
    """Sessions on 20, 21 and 22 Nov 2025, two turns each (user then assistant)."""
    db = tmp_path / "r2.db"
    ids = []
    with Store.open(db) as s:
        for day in (-1, 0, 1):
            start = T0 + timedelta(days=day)
            sid = s.start_session(backend="openai", model="gpt-realtime", voice=None,
                                  started_at=start)  # fmt: skip
            s.upsert_message(sid, role="user", item_id="u", text=f"q {start:%d}",
                             created_at=start + timedelta(seconds=1))  # fmt: skip
            s.upsert_message(sid, role="assistant", item_id="a", text=f"a {start:%d}",
                             created_at=start + timedelta(seconds=2))  # fmt: skip
            ids.append(sid)
    return db, ids


def texts(jsonl: str) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.splitlines()]


# ---------------------------------------------------------------------------- formats


def test_jsonl_round_trips_every_text(awkward_db) -> None:
    db, sid = awkward_db
    n, out = export(db, fmt="jsonl")
    assert n == len(AWKWARD)
    lines = out.splitlines()  # also splits at U+2028 / NEL if they were left raw
    assert len(lines) == len(AWKWARD)
    rows = [json.loads(line) for line in lines]
    assert [r["text"] for r in rows] == AWKWARD
    assert list(rows[0]) == list(COLUMNS)
    assert rows[1] == {
        "session_id": sid, "role": "assistant", "text": "two\nlines",
        "created_at": "2025-11-21T09:30:02.000Z", "item_id": "item1", "response_id": "resp1",
        "interrupted": True, "played_ms": 1234,
    }  # fmt: skip
    assert rows[0]["interrupted"] is False and rows[0]["played_ms"] is None
    assert "🤖" in out  # not \\u-escaped


def test_csv_round_trips_and_defuses_formulas(awkward_db) -> None:
    db, sid = awkward_db
    n, out = export(db, fmt="csv")
    assert n == len(AWKWARD)
    assert out.startswith(",".join(COLUMNS) + "\r\n")
    assert out.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert len(rows) == len(AWKWARD)
    cells = [r["text"] for r in rows]
    # No cell starts like a formula.
    for cell in cells:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert cells[4:11] == ["'=1+1", "'+x", "'-x", "'@x", "'\tleading tab", "'\rleading cr",
                           "''already quoted"]  # fmt: skip
    # Dropping one leading "'" gives the exact text back.
    assert [c[1:] if c.startswith("'") else c for c in cells] == AWKWARD
    assert rows[1]["interrupted"] == "true" and rows[1]["played_ms"] == "1234"
    assert rows[0]["interrupted"] == "false" and rows[0]["played_ms"] == ""
    assert rows[0]["response_id"] == "" and rows[1]["response_id"] == "resp1"
    assert {r["session_id"] for r in rows} == {sid}


def test_csv_written_to_a_real_file_reads_back(awkward_db, tmp_path: Path) -> None:
    db, _ = awkward_db
    target = tmp_path / "out.csv"
    with open(target, "w", encoding="utf-8", newline="") as f:
        run_export(db, fmt="csv", out=f)
    with open(target, encoding="utf-8", newline="") as f:
        cells = [r["text"] for r in csv.DictReader(f)]
    assert [c[1:] if c.startswith("'") else c for c in cells] == AWKWARD


def parse_markdown_turns(md: str) -> list[tuple[str, str, str]]:
    """(speaker, time note, text) per turn: continuation lines lose their 4-space indent."""
    turns: list[tuple[str, str, str]] = []
    for block in md.split("\n\n"):
        m = re.match(r"\*\*(you|r2)\*\* \(([^)]*)\): (.*)", block, re.S)
        if not m:
            continue
        first, *rest = m.group(3).split("\n")
        assert all(line.startswith("    ") for line in rest)
        turns.append((m.group(1), m.group(2), "\n".join([first] + [r[4:] for r in rest])))
    return turns


def test_markdown_is_readable_and_faithful(awkward_db) -> None:
    db, sid = awkward_db
    n, md = export(db, fmt="markdown")
    assert n == len(AWKWARD)
    assert f"## Session {sid}\n" in md
    assert "Started 2025-11-21 09:30:00 UTC, ended 2025-11-21 09:31:40 UTC" in md
    assert "backend `local` · model `gpt-realtime` · voice `ash`" in md
    assert "**you** (09:30:01): He said \"hi\", then left\n" in md
    assert "**r2** (09:30:02, interrupted after 1.2 s): two\n    lines\n" in md
    # Every line of every text is in the file, in order, after its speaker label.
    turns = parse_markdown_turns(md)
    expected = [re.sub(r"\r\n|\r", "\n", t) for t in AWKWARD]
    assert [t for _, _, t in turns] == expected
    assert [s for s, _, _ in turns] == ["you", "r2"] * (len(AWKWARD) // 2)
    # Lines that look like markdown blocks stay inside the turn, indented.
    assert "): # not a heading\n    - not a list\n    \n        indented, after" in md


def test_markdown_marks_days_and_continued_sessions(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    late = datetime(2025, 11, 21, 23, 59, 58, tzinfo=timezone.utc)
    with Store.open(db) as s:
        a = s.start_session(backend="local", model="m", voice=None, started_at=late)
        s.upsert_message(a, role="user", item_id="u1", text="before midnight",
                         created_at=late + timedelta(seconds=1))  # fmt: skip
        s.upsert_message(a, role="assistant", item_id="a1", text="after midnight",
                         created_at=late + timedelta(seconds=3))  # fmt: skip
        b = s.start_session(backend="local", model="m", voice=None, previous_session_id=a,
                            started_at=late + timedelta(seconds=10))  # fmt: skip
        s.upsert_message(b, role="user", item_id="u1", text="reconnected",
                         created_at=late + timedelta(seconds=11))  # fmt: skip
    _, md = export(db, fmt="markdown")
    assert "**you** (23:59:59): before midnight" in md
    assert "**r2** (2025-11-22 00:00:01): after midnight" in md
    assert md.index(f"## Session {a}") < md.index(f"## Session {b}")
    assert f"Continues session {a}." in md


# ---------------------------------------------------------------------------- filters


def test_session_filter_is_repeatable(three_days) -> None:
    db, (d20, d21, d22) = three_days
    n, out = export(db, sessions=[d22, d20])
    assert n == 4
    assert texts(out) == ["q 20", "a 20", "q 22", "a 22"]  # conversation order, not arg order
    _, md = export(db, fmt="markdown", sessions=[d21])
    assert f"## Session {d21}" in md and d20 not in md and d22 not in md


def test_since_and_until_with_dates_and_datetimes(three_days) -> None:
    db, _ = three_days
    assert texts(export(db, since="2025-11-21")[1]) == ["q 21", "a 21", "q 22", "a 22"]
    # A date-only --until covers that whole day.
    assert texts(export(db, until="2025-11-21")[1]) == ["q 20", "a 20", "q 21", "a 21"]
    assert texts(export(db, since="2025-11-21", until="2025-11-21")[1]) == ["q 21", "a 21"]
    # Datetimes: naive is UTC, --until is inclusive, offsets and Z are understood.
    assert texts(export(db, since="2025-11-21T09:30:02", until="2025-11-22T09:30:01Z")[1]) == [
        "a 21", "q 22"
    ]  # fmt: skip
    assert texts(export(db, since="2025-11-21T10:30:01.500+01:00")[1]) == ["a 21", "q 22", "a 22"]


def test_role_filter(three_days) -> None:
    db, _ = three_days
    assert texts(export(db, role="user")[1]) == ["q 20", "q 21", "q 22"]
    assert texts(export(db, role="assistant")[1]) == ["a 20", "a 21", "a 22"]
    n, out = export(db, fmt="csv", role="assistant")
    assert n == 3 and {r["role"] for r in csv.DictReader(io.StringIO(out))} == {"assistant"}


def test_export_sees_rows_of_a_writer_that_is_still_open(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    with Store.open(db) as w:
        sid = w.start_session(backend="local", model="m", voice=None)
        w.upsert_message(sid, role="user", item_id="u1", text="live")
        assert texts(export(db)[1]) == ["live"]
        w.upsert_message(sid, role="assistant", item_id="a1", text="still live")
        assert texts(export(db)[1]) == ["live", "still live"]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"since": "yesterday"}, "--since"),
        ({"since": "2025-13-01"}, "--since"),
        ({"until": "21/11/2025"}, "--until"),
        ({"since": "2025-11-22", "until": "2025-11-20"}, "--until"),
        ({"role": "system"}, "--role"),
        ({"fmt": "xml"}, "--format"),
        ({"sessions": ["20990101T000000Z-000000"]}, "--session"),
    ],
)
def test_bad_options_are_usage_errors(three_days, kw, needle: str) -> None:
    db, _ = three_days
    out = io.StringIO()
    with pytest.raises(UsageError) as e:
        run_export(db, out=out, **kw)
    assert str(e.value).startswith(needle)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2
    assert out.getvalue() == ""


def test_missing_or_foreign_database_is_an_error_not_an_empty_export(tmp_path: Path) -> None:
    out = io.StringIO()
    missing = tmp_path / "missing.db"
    with pytest.raises(UsageError, match="no such database"):
        run_export(missing, out=out)
    assert not missing.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(UsageError, match="is not an r2d2voice database"):
        run_export(notes, out=out, fmt="csv")
    assert out.getvalue() == ""


def test_empty_database_exports_nothing_but_is_valid(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    Store.open(db).close()
    assert export(db, fmt="jsonl") == (0, "")
    assert export(db, fmt="csv") == (0, ",".join(COLUMNS) + "\r\n")


# ---------------------------------------------------------------------------- sessions table


def test_format_sessions_table(three_days) -> None:
    db, ids = three_days
    with Store.open(db) as s:
        s.end_session(ids[0], T0 - timedelta(days=1) + timedelta(minutes=5))
        table = format_sessions(s.list_sessions())
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "STARTED", "(UTC)", "ENDED", "(UTC)", "TURNS", "BACKEND",
                                "MODEL"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ids
    assert lines[1].split()[1:] == ["2025-11-20", "09:30:00", "2025-11-20", "09:35:00", "1",
                                    "openai", "gpt-realtime"]  # fmt: skip
    assert lines[2].split()[3:5] == ["-", "1"]  # still open: no end time
    assert format_sessions([]) == "no sessions recorded\n"
