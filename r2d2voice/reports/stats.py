"""``stats``: per-turn latency percentiles, response outcomes, interruptions, errors, tool
calls per tool and status, and the pipeline's counters; with wake-word sessions, the wake
mode (wakes by source, wake→ready and conversation length, how conversations ended).

Latencies are intervals the appliance measured on the monotonic clock and stored as such;
nothing here subtracts wall-clock labels. The report is a plain dict first
(:func:`stats_report`); the text renderer only formats it.

From a fleet server the report covers the selected robots together (percentiles over all
their replies) and names them in ``devices``; ``--device`` narrows it to one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from r2d2voice.reports.source import FleetReader, open_records
from r2d2voice.reports.tables import check_format, table, time_range, write_report
from r2d2voice.storage.queries import Queries
from r2d2voice.storage.schema import TOOL_ROW_STATUSES

__all__ = ["COUNTERS", "PERCENTILES", "WAKE_ENDS", "format_stats", "percentile",
           "stats_command", "stats_report", "wake_report"]

#: Latency percentiles reported by ``stats`` (nearest-rank).
PERCENTILES = (50, 90, 99)
#: Counters the pipeline stores per session under ``sessions.metadata["stats"]``; always
#: shown, in this order. Other integer keys found there are summed and shown after them.
COUNTERS = (
    "frames_dropped",
    "audio_chunks_dropped",
    "underruns",
    "reconnects",
    "interruptions",
    "junk_messages",
    "service_errors",
    "frames_gated",
)


def stats_command(db_path: str | os.PathLike[str], *, out: TextIO | None = None,
                  fmt: str = "text", sessions: Sequence[str] = (), since: str | None = None,
                  until: str | None = None, devices: Sequence[str] = ()) -> dict[str, Any]:
    """The ``stats`` command: the report of ``db_path`` to ``out`` (stdout); returns it.
    ``db_path`` is a database file, or a fleet server URL (``devices``: only those robots).

    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    check_format(fmt)
    since_dt, until_dt = time_range(since, until)
    with open_records(db_path, devices) as records:
        records.check_sessions(sessions)
        report = stats_report(records.read, sessions=sessions, since=since_dt, until=until_dt)
        if records.fleet:
            report = {"devices": list(records.devices), **report}
    write_report(out if out is not None else sys.stdout, report, fmt, format_stats)
    return report


def percentile(sorted_values: Sequence[int | float], p: float) -> int | float | None:
    """Nearest-rank percentile (a value that was observed): the smallest value with at
    least ``p`` % of the values at or below it. None when there are no values."""
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p!r}")
    # rank = ceil(p/100 * n), in integers (p to 0.001) so 90 % of 10 is exactly rank 9
    rank = max(1, -(-round(p * 1000) * n // 100_000))
    return sorted_values[rank - 1]


def _latency(values: list[int]) -> dict[str, Any]:
    return {"n": len(values), **{f"p{p}": percentile(values, p) for p in PERCENTILES}}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stats_report(read: Queries | FleetReader, *, sessions: Sequence[str] = (),
                 since: datetime | None = None, until: datetime | None = None,
                 ) -> dict[str, Any]:
    """Latency percentiles, responses by status, interruptions, errors, tool calls and
    summed counters.

    Responses, messages, errors and tool calls count when created (started) in [``since``,
    ``until``); session counters when the session started in it.
    """
    window = {"sessions": sessions, "since": since, "until": until}
    first_audio, first_played = read.response_latencies(**window)
    by_status = read.response_status_counts(**window)
    rows = read.session_stats(sessions, since, until)
    recorded = [r.stats for r in rows if r.stats is not None]
    continued = sum(1 for r in rows if r.previous_session_id)

    counters: dict[str, int | None] = {}
    names = list(COUNTERS)
    for stats in recorded:
        names += [k for k, v in stats.items() if k not in names and _is_count(v)]
    for name in names:
        values = [v for s in recorded if _is_count(v := s.get(name))]
        counters[name] = sum(values) if values else None
    if counters["reconnects"] is None:
        reconnects = {"count": continued, "source": "previous_session_id"}
    else:
        reconnects = {"count": counters["reconnects"], "source": "counter"}
    report: dict[str, Any] = {
        "sessions": len(rows),
        "sessions_with_stats": len(recorded),
        "responses": {"total": sum(by_status.values()), "by_status": by_status},
        "latency_ms": {
            "percentile_method": "nearest-rank",
            "speech_stopped_to_first_audio_received": _latency(first_audio),
            "speech_stopped_to_first_audio_played": _latency(first_played),
        },
        "interrupted_replies": read.count_interrupted(**window),
        "errors": read.count_errors(**window),
        "tools": _tools(read.tool_counts(**window)),
        "counters": counters,
        "reconnects": reconnects,
        "sessions_continuing_earlier": continued,
    }
    wakes = [r.wake for r in rows if r.wake is not None]
    if wakes:
        report["wake"] = wake_report(wakes)
    return report


#: How a wake-mode conversation can end (``metadata["conversation_end"]``), in report order.
WAKE_ENDS = ("idle", "ended", "no service", "end of input", "stopped")


def _spread(values: list[int | float]) -> dict[str, Any]:
    values = sorted(values)
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "max": values[-1] if values else None}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def wake_report(wakes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The wake-word mode over sessions' wake facts: wakes by source, conversations (wakes
    whose conversation was recorded as over), wake→ready ms and conversation length s
    (nearest-rank p50/p90 and max), and conversations by how they ended."""
    by_source: dict[str, int] = {}
    ends: dict[str, int] = {}
    for w in wakes:
        source = str(w.get("wake_source") or "unknown")
        by_source[source] = by_source.get(source, 0) + 1
        if isinstance(end := w.get("conversation_end"), str):
            ends[end] = ends.get(end, 0) + 1
    order = [e for e in WAKE_ENDS if e in ends] + sorted(set(ends) - set(WAKE_ENDS))
    return {
        "wakes": len(wakes),
        "by_source": dict(sorted(by_source.items())),
        "conversations": sum(ends.values()),
        "wake_to_ready_ms": _spread([v for w in wakes if _number(v := w.get("wake_ready_ms"))]),
        "conversation_s": _spread([v for w in wakes if _number(v := w.get("conversation_s"))]),
        "ends": {e: ends[e] for e in order},
    }


def _wake_lines(wake: dict[str, Any]) -> list[str]:
    sources = ", ".join(f"{k} {v}" for k, v in wake["by_source"].items())
    ends = ", ".join(f"{k} {v}" for k, v in wake["ends"].items())
    rows = [[label, str(d["n"]), _na(d["p50"]), _na(d["p90"]), _na(d["max"])]
            for label, d in (("wake to ready, ms", wake["wake_to_ready_ms"]),
                             ("conversation length, s", wake["conversation_s"]))]
    return ["", f"Wakes: {wake['wakes']} ({sources})",
            f"Conversations: {wake['conversations']}" + (f" (ended: {ends})" if ends else ""),
            *table(("", "N", "P50", "P90", "MAX"), rows)]


def _tools(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {"calls": sum(n for by in counts.values() for n in by.values()), "by_tool": counts}


def _tool_table(tools: dict[str, Any]) -> list[str]:
    if not tools["calls"]:
        return ["Tool calls: 0"]
    statuses = [s for s in TOOL_ROW_STATUSES[1:] + TOOL_ROW_STATUSES[:1]
                if any(s in by for by in tools["by_tool"].values())]
    rows = [[name, str(sum(by.values())), *(str(by.get(s, 0)) for s in statuses)]
            for name, by in tools["by_tool"].items()]
    return [f"Tool calls: {tools['calls']}",
            *table(("TOOL", "CALLS", *(s.upper() for s in statuses)), rows)]


def _na(v: Any) -> str:
    return "n/a" if v is None else str(v)


def format_stats(report: dict[str, Any]) -> str:
    """The stats report as text."""
    resp = report["responses"]
    statuses = ", ".join(f"{k} {v}" for k, v in resp["by_status"].items())
    out = [f"Robots: {', '.join(report['devices']) or 'none'}"] if "devices" in report else []
    out += [
        f"Sessions: {report['sessions']}",
        f"Responses: {resp['total']}" + (f" ({statuses})" if statuses else ""),
        "",
        "Latency from speech stopped, ms (nearest-rank percentiles)",
    ]
    lat = report["latency_ms"]
    out += table(
        ("", "N", *(f"P{p}" for p in PERCENTILES)),
        [
            [label, str(d["n"]), *(_na(d[f"p{p}"]) for p in PERCENTILES)]
            for label, d in (
                ("first reply audio received", lat["speech_stopped_to_first_audio_received"]),
                ("first reply audio played", lat["speech_stopped_to_first_audio_played"]),
            )
        ],
    )
    errors = report["errors"]
    out += [
        "",
        f"Interrupted replies: {report['interrupted_replies']}",
        f"Errors recorded: service {errors['service']}, local {errors['local']}",
        "",
        *_tool_table(report["tools"]),
        "",
        f"Pipeline counters, summed over {report['sessions_with_stats']} of"
        f" {report['sessions']} sessions that recorded them:",
    ]
    names = list(report["counters"])
    width = max(len(n) for n in names)
    for name in names:
        value = report["counters"][name]
        if name == "reconnects" and report["reconnects"]["source"] != "counter":
            shown = (f"{report['reconnects']['count']} (not counted by the pipeline: sessions"
                     " continuing an earlier one)")
        else:
            shown = _na(value)
        out.append(f"  {name.ljust(width)}  {shown}")
    if "wake" in report:
        out += _wake_lines(report["wake"])
    return "\n".join(out) + "\n"
