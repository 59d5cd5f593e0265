"""Exports: faithful JSONL / CSV / Markdown, filters, and refusal of bad input."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
from storage_support import T0, SteppedClock, at, record_a_conversation_with_tools
from support import clean_env

from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.reports.export import COLUMNS, export_command, run_export
from r2d2voice.reports.sessions import format_sessions, sessions_command
from r2d2voice.storage.database import Store

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
    "*beep* <b>hi</b>",
    "[a](b) ![c](d) `e` _f_ __g__ ~~h~~ &amp; x|y back\\slash\\",
    "1. one\n2) two\n> quote\n  lead, trail  \n===\n\n",
    "    code?\n\tTab | col\n--- | ---",
]


def export(db: Path, **kw) -> tuple[int, str]:
    out = io.StringIO(newline="")
    n = run_export(db, out=out, **kw)
    return n, out.getvalue()


@pytest.fixture
def awkward_db(tmp_path: Path) -> tuple[Path, str]:
    db = tmp_path / "r2.db"
    clock = SteppedClock()
    with Store.open(db, now=clock) as s:
        sid = s.write.start_session(backend="local", model="gpt-realtime", voice="ash")
        for i, text in enumerate(AWKWARD):
            clock.set(at(i + 1))
            s.write.upsert_message(sid, role="user" if i % 2 == 0 else "assistant",
                                   item_id=f"item{i}", seq=i + 1, text=text,
                                   response_id=None if i % 2 == 0 else f"resp{i}")
        s.write.mark_interrupted(sid, item_id="item1", seq=2, played_ms=1234)
        clock.set(at(100))
        s.write.end_session(sid)
    return db, sid


@pytest.fixture
def three_days(tmp_path: Path) -> tuple[Path, list[str]]:
    """Sessions on 20, 21 and 22 Nov 2025, two turns each (user then assistant)."""
    db = tmp_path / "r2.db"
    ids = []
    clock = SteppedClock()
    with Store.open(db, now=clock) as s:
        for day in (-1, 0, 1):
            start = T0 + timedelta(days=day)
            clock.set(start)
            sid = s.write.start_session(backend="openai", model="gpt-realtime", voice=None)
            clock.step(seconds=1)
            s.write.upsert_message(sid, role="user", item_id="u", seq=1, text=f"q {start:%d}")
            clock.step(seconds=1)
            s.write.upsert_message(sid, role="assistant", item_id="a", seq=2,
                                   text=f"a {start:%d}")
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
        "session_id": sid, "seq": 2, "role": "assistant", "text": "two\nlines",
        "created_at": "2025-11-21T09:30:02.000Z", "item_id": "item1", "response_id": "resp1",
        "interrupted": True, "played_ms": 1234, "text_kept": True,
        # a message has the tool columns too, empty
        "name": None, "arguments": None, "output": None, "status": None, "duration_ms": None,
        "call_id": None,
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
    assert [r["seq"] for r in rows] == [str(i + 1) for i in range(len(AWKWARD))]
    assert {r["session_id"] for r in rows} == {sid}


def test_csv_written_to_a_real_file_reads_back(awkward_db, tmp_path: Path) -> None:
    db, _ = awkward_db
    target = tmp_path / "out.csv"
    with open(target, "w", encoding="utf-8", newline="") as f:
        run_export(db, fmt="csv", out=f)
    with open(target, encoding="utf-8", newline="") as f:
        cells = [r["text"] for r in csv.DictReader(f)]
    assert [c[1:] if c.startswith("'") else c for c in cells] == AWKWARD


_HARD_BREAK = re.compile(r"(?<!\\)((?:\\\\)*)\\$")  # an unescaped backslash ending a line
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])|&#(\d+);")


def unmarkdown(body: str) -> str:
    """The text a CommonMark renderer shows for a turn's ``body`` (what follows ``": "``):
    a line continues the turn only after a hard break (``\\`` at the end of the one before)
    and indented four spaces; backslash escapes and numeric references give the character
    they stand for. Fails on anything else (a soft break, a block, an unescaped markup
    character)."""
    lines = body.split("\n")
    for line, following in itertools.pairwise(lines):
        assert _HARD_BREAK.search(line), f"no hard break ending {line!r}"
        assert following.startswith("    "), f"not indented: {following!r}"
    plain = [_HARD_BREAK.sub(r"\1", line) for line in lines[:-1]] + lines[-1:]
    plain = [plain[0]] + [line[4:] for line in plain[1:]]
    for line in plain:
        bare = _ESCAPED.sub("\0", line)  # what is left unescaped
        assert not re.search(r"[\\`*\[\]<&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", bare), line
        # nothing a renderer would drop (edge spaces) or read as a block
        assert not re.match(r"[ \t#>+=-]|\d+[.)](\s|$)", line), line
        assert not line.endswith((" ", "\t")), line
    return "\n".join(_ESCAPED.sub(lambda m: m[1] or chr(int(m[2])), line) for line in plain)


def as_said(text: str) -> str:
    """What a Markdown turn shows of ``text``: line ends as ``\\n``, none trailing."""
    return re.sub(r"\n+$", "", re.sub(r"\r\n|\r", "\n", text))


def parse_markdown_turns(md: str) -> list[tuple[str, str, str]]:
    """(speaker, time note, text as rendered) per turn."""
    turns: list[tuple[str, str, str]] = []
    for block in md.split("\n\n"):
        m = re.match(r"\*\*(you|r2)\*\* \(([^)]*)\): (.*)", block, re.S)
        if m:
            turns.append((m.group(1), m.group(2), unmarkdown(m.group(3))))
    return turns


def test_markdown_is_readable_and_faithful(awkward_db) -> None:
    db, sid = awkward_db
    n, md = export(db, fmt="markdown")
    assert n == len(AWKWARD)
    assert f"## Session {sid}\n" in md
    assert "Started 2025-11-21 09:30:00 UTC, ended 2025-11-21 09:31:40 UTC" in md
    assert "backend `local` · model `gpt-realtime` · voice `ash`" in md
    assert "**you** (09:30:01): He said \"hi\", then left\n" in md
    assert "**r2** (09:30:02, interrupted after 1.2 s): two\\\n    lines\n" in md
    # Every text, line by line, renders back as it was said, after its speaker label.
    turns = parse_markdown_turns(md)
    assert [t for _, _, t in turns] == [as_said(t) for t in AWKWARD]
    assert [s for s, _, _ in turns] == ["you", "r2"] * (len(AWKWARD) // 2)
    # Markup is escaped, not interpreted: emphasis, HTML, code, links, tables, entities ...
    assert "**you** (09:30:15): \\*beep\\* \\<b>hi\\</b>\n" in md
    assert ("): \\[a\\](b) !\\[c\\](d) \\`e\\` \\_f\\_ \\_\\_g\\_\\_ \\~\\~h\\~\\~ \\&amp; x\\|y"
            " back\\\\slash\\\\\n") in md
    # ... and so are lines that would start a block, or lose their edge spaces; a blank line
    # is a hard break of its own, never the end of the turn's paragraph.
    assert ("): \\# not a heading\\\n    \\- not a list\\\n    \\\n"
            "    &#32;&#32;&#32;&#32;indented, after a blank line\n") in md
    assert ("): 1\\. one\\\n    2\\) two\\\n    \\> quote\\\n"
            "    &#32;&#32;lead, trail&#32;&#32;\\\n    \\===\n") in md


def test_markdown_renders_back_to_the_transcript(awkward_db) -> None:
    """With a real CommonMark renderer (markdown-it-py, tables and strikethrough on): each
    turn is one paragraph of plain text and line breaks, the transcript as said."""
    import markdown_it  # the test extra installs it

    db, _ = awkward_db
    tokens = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(
        export(db, fmt="markdown")[1])
    said = []
    for inline in (t for t in tokens if t.type == "inline"):
        kids = [k for k in inline.children or () if k.type != "text" or k.content]
        if [k.type for k in kids[:3]] != ["strong_open", "text", "strong_close"]:
            continue  # a session header
        assert {k.type for k in kids[3:]} <= {"text", "hardbreak"}, inline.content
        shown = "".join("\n" if k.type == "hardbreak" else k.content for k in kids[3:])
        said.append(re.sub(r"^ \([^)]*\):( |$)", "", shown))
    assert said == [as_said(t) for t in AWKWARD]


def test_markdown_marks_days_and_continued_sessions(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    late = datetime(2025, 11, 21, 23, 59, 58, tzinfo=timezone.utc)
    clock = SteppedClock(late)
    with Store.open(db, now=clock) as s:
        a = s.write.start_session(backend="local", model="m", voice=None)
        clock.step(seconds=1)
        s.write.upsert_message(a, role="user", item_id="u1", seq=1, text="before midnight")
        clock.step(seconds=2)
        s.write.upsert_message(a, role="assistant", item_id="a1", seq=2, text="after midnight")
        clock.step(seconds=7)
        b = s.write.start_session(backend="local", model="m", voice=None, previous_session_id=a)
        clock.step(seconds=1)
        s.write.upsert_message(b, role="user", item_id="u1", seq=1, text="reconnected")
    _, md = export(db, fmt="markdown")
    assert "**you** (23:59:59): before midnight" in md
    assert "**r2** (2025-11-22 00:00:01): after midnight" in md
    assert md.index(f"## Session {a}") < md.index(f"## Session {b}")
    assert f"Continues session {a}." in md


# ---------------------------------------------------------------------------- tool executions


async def test_tool_executions_export_in_conversation_order_in_every_format(
        tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    sid = await record_a_conversation_with_tools(db)
    n, out = export(db)
    rows = [json.loads(line) for line in out.splitlines()]
    assert n == 7
    assert [(r["seq"], r["role"]) for r in rows] == [
        (1, "user"), (2, "tool"), (3, "assistant"), (4, "tool"), (5, "tool"), (6, "tool"),
        (7, "assistant")]
    assert rows[1] == {
        "session_id": sid, "seq": 2, "role": "tool", "text": None,
        "created_at": "2025-11-21T09:30:01.000Z", "item_id": "fc_1", "response_id": "r1",
        "interrupted": None, "played_ms": None, "text_kept": True, "name": "turn_head",
        "arguments": '{"degrees": -90}', "output": "turned to -90", "status": "ok",
        "duration_ms": 41, "call_id": "call_1",
    }  # fmt: skip
    assert [(r["name"], r["status"], r["output"]) for r in rows if r["role"] == "tool"] == [
        ("turn_head", "ok", "turned to -90"), ("note", "error", "-disk\nfull"),
        ("fly_*away*", "rejected", "unknown tool: fly_*away*"), ("get_time", "running", None)]
    # CSV: the same rows and columns, formula-safe.
    _, text = export(db, fmt="csv")
    table = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(table[0]) == list(COLUMNS)
    assert [(r["seq"], r["role"], r["name"]) for r in table] == [
        (str(r["seq"]), r["role"], r["name"] or "") for r in rows]
    note = table[3]
    assert (note["arguments"], note["output"], note["status"], note["duration_ms"]) == (
        '{"text": "=cmd|x"}', "'-disk\nfull", "error", "7")
    assert (note["text"], note["interrupted"], note["text_kept"]) == ("", "", "true")
    # Markdown: one readable line per execution, in its place among the turns.
    _, md = export(db, fmt="markdown")
    lines = [block for block in md.split("\n\n") if block.startswith(("**", "🔧"))]
    assert lines == [
        "**you** (09:30:01): look left, then note it",
        '🔧 **turn_head** (09:30:01): {"degrees": -90} → turned to -90 (ok, 41 ms)',
        "**r2** (09:30:02, interrupted after 0.8 s): Turning.",
        '🔧 **note** (09:30:02): {"text": "=cmd\\|x"} → \\-disk\\\n    full (error, exit 2, 7 ms)',
        "🔧 **fly\\_\\*away\\*** (09:30:02): {bad → unknown tool: fly\\_\\*away\\* (rejected)",
        "🔧 **get_time** (09:30:03): {} (running)",
        "**r2** (09:30:03): Noted.",
    ]
    # Arguments and outputs render back as they were (the tool's name too).
    note = lines[3].split("): ", 1)[1].rsplit(" (error", 1)[0]
    assert [unmarkdown(part) for part in note.split(" → ")] == ['{"text": "=cmd|x"}',
                                                               "-disk\nfull"]
    # --role tool, and the message roles leave the tools out.
    assert [r["call_id"] for r in map(json.loads, export(db, role="tool")[1].splitlines())] \
        == ["call_1", "call_2", "call_3", "call_4"]
    assert texts(export(db, role="assistant")[1]) == ["Turning.", "Noted."]
    # Time filters select tool executions by their start label.
    assert [(r["seq"], r["role"]) for r in map(
        json.loads, export(db, since="2025-11-21T09:30:03")[1].splitlines())] == [
        (6, "tool"), (7, "assistant")]


async def test_privacy_mode_export_says_the_text_was_not_kept(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    await record_a_conversation_with_tools(db, store_text=False)
    rows = [json.loads(line) for line in export(db)[1].splitlines()]
    assert {r["text_kept"] for r in rows} == {False}
    assert [r["text"] for r in rows if r["role"] != "tool"] == ["(not kept)"] * 3
    assert [(r["name"], r["arguments"], r["output"], r["status"], r["duration_ms"])
            for r in rows if r["role"] == "tool"] == [
        ("turn_head", "(not kept)", "(not kept)", "ok", 41),
        ("note", "(not kept)", "(not kept)", "error", 7),
        ("fly_*away*", "(not kept)", "(not kept)", "rejected", None),
        ("get_time", "(not kept)", None, "running", None)]
    table = list(csv.DictReader(io.StringIO(export(db, fmt="csv")[1], newline="")))
    assert table[0]["text"] == "(not kept)" and table[0]["text_kept"] == "false"
    _, md = export(db, fmt="markdown")
    assert "**you** (09:30:01): *(not kept)*" in md
    assert "🔧 **turn_head** (09:30:01): *(not kept)* → *(not kept)* (ok, 41 ms)" in md
    assert "note it" not in md and "degrees" not in md


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
        sid = w.write.start_session(backend="local", model="m", voice=None)
        w.write.upsert_message(sid, role="user", item_id="u1", seq=1, text="live")
        assert texts(export(db)[1]) == ["live"]
        w.write.upsert_message(sid, role="assistant", item_id="a1", seq=2, text="still live")
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
        ({"role": "tools"}, "--role"),
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


def test_sessions_table(three_days) -> None:
    db, ids = three_days
    with Store.open(db, now=lambda: T0 - timedelta(days=1) + timedelta(minutes=5)) as s:
        s.write.end_session(ids[0])
    out = io.StringIO()
    sessions_command(db, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["ID", "STARTED", "(UTC)", "ENDED", "(UTC)", "TURNS", "BACKEND",
                                "MODEL"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ids
    assert lines[1].split()[1:] == ["2025-11-20", "09:30:00", "2025-11-20", "09:35:00", "1",
                                    "openai", "gpt-realtime"]  # fmt: skip
    assert lines[2].split()[3:5] == ["-", "1"]  # still open: no end time
    assert format_sessions([]) == "no sessions recorded\n"


def test_sessions_command_on_a_missing_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such database"):
        sessions_command(tmp_path / "none.db", out=io.StringIO())
    assert not (tmp_path / "none.db").exists()


# ---------------------------------------------------------------------------- --output


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


ALL = ["q 20", "a 20", "q 21", "a 21", "q 22", "a 22"]


def test_output_file_is_complete_private_and_alone(three_days, tmp_path: Path) -> None:
    db, _ = three_days
    target = tmp_path / "out" / "t.jsonl"
    target.parent.mkdir()
    old = os.umask(0o022)
    try:
        assert export_command(db, output=target) == 6
    finally:
        os.umask(old)
    assert texts(target.read_text(encoding="utf-8")) == ALL
    assert mode(target) == 0o600
    assert os.listdir(target.parent) == ["t.jsonl"]
    # An existing file is replaced whole, and made private.
    target.write_text("old content that is longer than nothing\n" * 100)
    target.chmod(0o644)
    assert export_command(db, fmt="csv", role="user", output=target) == 3
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert [r["text"] for r in rows] == ["q 20", "q 21", "q 22"]
    assert mode(target) == 0o600
    assert os.listdir(target.parent) == ["t.jsonl"]


def test_refused_export_leaves_no_file_and_an_existing_one_untouched(
    three_days, tmp_path: Path
) -> None:
    db, _ = three_days
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "t.jsonl"
    with pytest.raises(UsageError, match="--session"):
        export_command(db, output=target, sessions=["20990101T000000Z-000000"])
    assert os.listdir(out_dir) == []
    target.write_text("keep me\n")
    with pytest.raises(UsageError, match="no such database"):
        export_command(tmp_path / "none.db", output=target)
    assert target.read_text() == "keep me\n"
    assert os.listdir(out_dir) == ["t.jsonl"]
    with pytest.raises(UsageError, match="is a directory"):
        export_command(db, output=out_dir)


CHILD = """
import resource, signal, sys
from r2d2voice.errors import R2Error
from r2d2voice.reports.export import export_command
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    export_command(sys.argv[1], output=sys.argv[2])
except R2Error as exc:
    print(type(exc).__name__, exc)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_export_failing_mid_write_leaves_no_partial_file(tmp_path: Path, existing: bool) -> None:
    """The file system refuses the write halfway (file size limit, like a full disk)."""
    db = tmp_path / "big.db"
    with Store.open(db) as s:
        sid = s.write.start_session(backend="local", model="m", voice=None)
        with s.write.batch():
            for i in range(300):
                s.write.upsert_message(sid, role="user", item_id=f"u{i}", seq=i + 1,
                                       text="beep " * 200)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "t.jsonl"
    if existing:
        target.write_text("previous export\n")
    r = subprocess.run([sys.executable, "-c", CHILD, str(db), str(target)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == RuntimeFailure.exit_code, r.stderr
    assert r.stdout.startswith(f"RuntimeFailure cannot write {target}: File too large")
    assert os.listdir(out_dir) == (["t.jsonl"] if existing else [])
    if existing:
        assert target.read_text() == "previous export\n"


def test_output_to_a_fifo_is_written_in_place(three_days, tmp_path: Path) -> None:
    """Not a regular file (a FIFO, /dev/null): written into, never replaced."""
    db, _ = three_days
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")),
                              daemon=True)
    reader.start()
    assert export_command(db, output=fifo) == 6
    reader.join(10)
    assert not reader.is_alive()
    assert texts(got[0]) == ALL
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe", "r2.db"]


# ---------------------------------------------------------------------------- a reader gone

# The CLI, with finalizer failures ("Exception ignored in ...") written to a file: the CLI
# silences stderr once its reader is gone, which would hide them.
_CLI_REPORTING_FINALIZERS = """
import os, sys
def report(u):
    with open(os.environ["UNRAISABLE_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}\\n")
sys.unraisablehook = report
from r2d2voice.cli.main import main
main(prog_name="r2d2voice")
"""


@pytest.mark.parametrize("fmt", ["jsonl", "markdown"])
def test_export_into_a_pipe_closed_early_is_quiet_and_closes_cleanly(
        tmp_path: Path, fmt: str) -> None:
    """``r2d2voice export | head -1``: exit 0 (a normal end), nothing on stderr, and no cursor
    outlives its database (messages and tool executions, two cursors)."""
    db = tmp_path / "r2.db"
    trio.run(record_a_conversation_with_tools, db)
    with Store.open(db) as s:  # ~1 MB: far more than a pipe holds
        sid = s.write.start_session(backend="local", model="local", voice=None)
        with s.write.batch():
            for seq in range(1, 301):
                say = f"{seq} " + "beep " * 800
                s.write.upsert_message(sid, role="user", item_id=f"i{seq}", seq=seq, text=say)
    log = tmp_path / "unraisable.log"
    env = clean_env(HOME=str(tmp_path), UNRAISABLE_LOG=str(log))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI_REPORTING_FINALIZERS, "export", "--db", str(db),
         "--format", fmt],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith((b'{"session_id": ', b"# r2d2voice"))
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert err == b""
    assert not log.exists(), log.read_text()
