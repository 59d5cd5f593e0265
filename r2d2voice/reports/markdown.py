"""``export --format markdown``: transcripts a person reads, rendered as they were said.

Every text (a turn, a tool's name, arguments and output) is escaped so that a CommonMark
renderer shows it as it is (:func:`escape`): characters Markdown would read as markup get a
backslash, line breaks become hard breaks inside the turn's one paragraph, and spaces or tabs
at either end of a line, which a renderer would drop, become character references. A text's
trailing line breaks are not shown: CommonMark has no way to end a paragraph with one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from r2d2voice.reports.tables import clock

if TYPE_CHECKING:
    from r2d2voice.reports.source import Records
    from r2d2voice.storage.queries import MessageRow, SessionRow, ToolRow
    from r2d2voice.storage.shipping.rows import FleetMessageRow, FleetSessionRow, FleetToolRow

__all__ = ["escape", "write_markdown"]

_SPEAKER = {"user": "you", "assistant": "r2"}
_LINE_END = re.compile(r"\r\n|\r|\n")
#: Continuation lines of a turn: indented (never a block of their own), after a hard break.
_BREAK = "\\\n    "

# Markup anywhere in a line: backslash, code, emphasis, links, raw HTML and autolinks,
# entities, GFM tables and strikethrough. An underscore between two letters or digits opens
# no emphasis and stays as it is (turn_head).
_INLINE = re.compile(r"([\\`*\[\]<&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
# Markup at the start of a line: heading, block quote, list item, setext underline, and
# ordered list item ("1. " / "1)"; "3.14" stays as it is).
_LINE_START = re.compile(r"^(?:[#>+=-]|\d{1,9}[.)](?=[ \t]|$))")
_EDGE_SPACE = re.compile(r"^[ \t]+|[ \t]+$")


def _references(match: re.Match[str]) -> str:
    return "".join(f"&#{ord(c)};" for c in match.group())


def _escape_line(line: str) -> str:
    text = _INLINE.sub(r"\\\1", line)
    lead = len(text) - len(text.lstrip(" \t"))
    text = text[:lead] + _LINE_START.sub(_line_start, text[lead:], count=1)
    return _EDGE_SPACE.sub(_references, text)


def _line_start(match: re.Match[str]) -> str:
    marker = match.group()
    return f"{marker[:-1]}\\{marker[-1]}"


def escape(text: str) -> str:
    """``text`` as Markdown inline content that renders back to ``text``: one paragraph,
    each line after the first on a hard break (``\\``) and indented four spaces."""
    lines = _LINE_END.split(text)
    while len(lines) > 1 and lines[-1] == "":  # no paragraph ends on a line break
        lines.pop()
    # An empty line leaves its hard break alone on a line: a break of its own, never the
    # blank line that would end the paragraph.
    return _BREAK.join(_escape_line(line) for line in lines)


def _code(value: str) -> str:
    """``value`` as a code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _session_header(info: SessionRow | FleetSessionRow | None, session_id: str,
                    device_id: str | None = None) -> str:
    lines = [f"## Session {escape(session_id)}", ""]
    facts = [] if device_id is None else [f"Robot {_code(device_id)}"]
    if info is not None:
        started = f"Started {clock(info.started_at)} UTC"
        if info.ended_at:
            started += f", ended {clock(info.ended_at)} UTC"
        facts += [started, f"backend {_code(info.backend)}", f"model {_code(info.model)}"]
        if info.voice:
            facts.append(f"voice {_code(info.voice)}")
    if facts:
        lines.append(" · ".join(facts) + ".")
        if info is not None and info.previous_session_id:
            lines.append(f"Continues session {escape(info.previous_session_id)}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def _when(created_at: str, day: str) -> str:
    # The time shows the date only when the row is not on the session's first day.
    return created_at[11:19] if created_at[:10] == day else clock(created_at)


def _turn(row: MessageRow | FleetMessageRow, day: str, not_kept: str) -> str:
    when = _when(row.created_at, day)
    if row.interrupted:
        when += ", interrupted"
        if row.played_ms is not None:
            when += f" after {row.played_ms / 1000:.1f} s"
    # Everything after ": " is the text.
    body = escape(row.text or "") if row.text_kept else f"*{not_kept}*"
    return f"**{_SPEAKER[row.role]}** ({when}): {body}\n\n"


def _tool_line(row: ToolRow | FleetToolRow, day: str, not_kept: str) -> str:
    """``🔧 **turn_head** (09:30:05): {"degrees": -90} → turned to -90 (ok, 41 ms)``"""
    if row.text_kept:
        call = escape(_on_one_line(row.arguments or ""))
        result = "" if row.output is None else escape(row.output)
    else:
        call = result = f"*{not_kept}*"
    outcome = [row.status]
    if row.exit_code not in (None, 0):
        outcome.append(f"exit {row.exit_code}")
    if row.duration_ms is not None:
        outcome.append(f"{row.duration_ms} ms")
    arrow = "" if row.status == "running" else f" → {result}" if result else " →"
    return (f"🔧 **{escape(row.name)}** ({_when(row.started_at, day)}): {call}{arrow}"
            f" ({', '.join(outcome)})\n\n")


def _on_one_line(arguments: str) -> str:
    """Tool arguments as a person reads them in a transcript: JSON spread over lines (a model
    may indent it) on one line, ``{"degrees": -90}``; anything else as it came. JSONL and CSV
    keep the arguments exactly as sent."""
    if "\n" not in arguments and "\r" not in arguments:
        return arguments
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments


def write_markdown(rows: Iterable[Any], out: TextIO, records: Records, *,
                   not_kept: str) -> int:
    """Write ``rows`` (messages and tool executions in conversation order) as Markdown, a
    header per session (its facts looked up as the stream enters it); returns the rows.
    ``not_kept`` is what a text written in privacy mode reads."""
    out.write("# r2d2voice transcript\n\n")
    n = 0
    current: tuple[str | None, str] | None = None
    day = ""
    fleet = records.fleet
    for row in rows:
        device = row.device_id if fleet else None
        if (device, row.session_id) != current:
            current = (device, row.session_id)
            info = records.session(row.session_id, device)
            label = row.started_at if row.role == "tool" else row.created_at
            day = (info.started_at if info else label)[:10]
            out.write(_session_header(info, row.session_id, device))
        if row.role == "tool":
            out.write(_tool_line(row, day, not_kept))
        else:
            out.write(_turn(row, day, not_kept))
        n += 1
    return n
