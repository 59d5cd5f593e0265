"""``stats``: per-turn latency percentiles, response outcomes, interruptions, errors and the
pipeline's counters.

Latencies are intervals the appliance measured on the monotonic clock and stored as such;
nothing here subtracts wall-clock labels. The report is a plain dict first
(:func:`stats_report`); the text renderer only formats it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from r2d2voice.reports.tables import check_format, check_sessions, table, time_range, write_report
from r2d2voice.storage.database import Store

__all__ = ["COUNTERS", "PERCENTILES", "format_stats", "percentile", "stats_command",
           "stats_report"]

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
                  until: str | None = None) -> dict[str, Any]:
    """The ``stats`` command: the report of ``db_path`` to ``out`` (stdout); returns it.

    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    check_format(fmt)
    since_dt, until_dt = time_range(since, until)
    with Store.open(db_path, create=False) as store:
        check_sessions(store, sessions)
        report = stats_report(store, sessions=sessions, since=since_dt, until=until_dt)
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


def stats_report(store: Store, *, sessions: Sequence[str] = (), since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, Any]:
    """Latency percentiles, responses by status, interruptions, errors and summed counters.

    Responses, messages and errors count when created in [``since``, ``until``); session
    counters when the session started in it.
    """
    window = {"sessions": sessions, "since": since, "until": until}
    first_audio, first_played = store.read.response_latencies(**window)
    by_status = store.read.response_status_counts(**window)
    rows = store.read.session_stats(sessions, since, until)
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
    return {
        "sessions": len(rows),
        "sessions_with_stats": len(recorded),
        "responses": {"total": sum(by_status.values()), "by_status": by_status},
        "latency_ms": {
            "percentile_method": "nearest-rank",
            "speech_stopped_to_first_audio_received": _latency(first_audio),
            "speech_stopped_to_first_audio_played": _latency(first_played),
        },
        "interrupted_replies": store.read.count_interrupted(**window),
        "errors": store.read.count_errors(**window),
        "counters": counters,
        "reconnects": reconnects,
        "sessions_continuing_earlier": continued,
    }


def _na(v: Any) -> str:
    return "n/a" if v is None else str(v)


def format_stats(report: dict[str, Any]) -> str:
    """The stats report as text."""
    resp = report["responses"]
    statuses = ", ".join(f"{k} {v}" for k, v in resp["by_status"].items())
    out = [
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
    return "\n".join(out) + "\n"
