"""The ``usage`` and ``stats`` reports: token usage with an estimated cost, and per-turn latency,
response outcomes and the pipeline's counters. Read-only over the store; plain text or JSON.

Both reports are built as plain dicts first (:func:`usage_report`, :func:`stats_report`); the
text renderers only format them, so the JSON output and the table always agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, TextIO

from r2d2voice.errors import UsageError
from r2d2voice.reports.export import parse_time_option
from r2d2voice.storage.store import Store, UsageSummaryRow

__all__ = [
    "COUNTERS",
    "PERCENTILES",
    "REPORT_FORMATS",
    "Prices",
    "format_stats",
    "format_usage",
    "percentile",
    "run_stats",
    "run_usage",
    "stats_report",
    "usage_report",
]

REPORT_FORMATS = ("text", "json")
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
_MILLION = 1_000_000


# ---------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens.

    The defaults are the published prices of gpt-realtime-class models when this was written.
    They are defaults to override, not facts: published prices change, so set
    R2D2_PRICE_AUDIO_IN, R2D2_PRICE_AUDIO_IN_CACHED, R2D2_PRICE_TEXT_IN,
    R2D2_PRICE_TEXT_IN_CACHED, R2D2_PRICE_AUDIO_OUT, R2D2_PRICE_TEXT_OUT (environment or env
    file) to the current ones.
    """

    audio_in: float = 32.00
    audio_in_cached: float = 0.40
    text_in: float = 4.00
    text_in_cached: float = 0.40
    audio_out: float = 64.00
    text_out: float = 16.00

    @classmethod
    def from_settings(cls, settings: Any) -> Prices:
        """Prices from ``settings.price_<field>`` where set (not None), else the defaults."""
        values: dict[str, float] = {}
        for f in fields(cls):
            value = getattr(settings, f"price_{f.name}", None)
            if value is None:
                continue
            try:
                price = float(value)
            except (TypeError, ValueError):
                raise UsageError(f"price_{f.name}: {value!r} is not a number") from None
            if not price >= 0:  # also refuses NaN
                raise UsageError(f"price_{f.name}: {value!r} is not a price (USD >= 0)")
            values[f.name] = price
        return cls(**values)

    def cost(self, row: UsageSummaryRow) -> float:
        """Estimated USD for ``row``: cached input (a part of the input) at the cached price,
        split between text and audio as the store estimates it (see UsageSummaryRow)."""
        text_in = row.input_text - row.cached_text_est
        audio_in = row.input_audio - row.cached_audio_est
        return (
            text_in * self.text_in
            + row.cached_text_est * self.text_in_cached
            + audio_in * self.audio_in
            + row.cached_audio_est * self.audio_in_cached
            + row.output_text * self.text_out
            + row.output_audio * self.audio_out
        ) / _MILLION


# ---------------------------------------------------------------------------- options


def _time_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    since_dt = None if since is None else parse_time_option(since, option="--since")
    until_dt = None if until is None else parse_time_option(until, option="--until", end=True)
    if since_dt is not None and until_dt is not None and until_dt <= since_dt:
        raise UsageError(f"--until ({until}) is not after --since ({since})")
    return since_dt, until_dt


def _check_sessions(store: Store, sessions: Sequence[str]) -> None:
    for sid in sessions:
        if store.get_session(sid) is None:
            raise UsageError(f"--session: no session {sid!r} in {store.path}")


def _check_format(fmt: str) -> None:
    if fmt not in REPORT_FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(REPORT_FORMATS)}")


# ---------------------------------------------------------------------------- usage

_TOKEN_FIELDS = (
    "responses",
    "input_text",
    "input_audio",
    "input_cached",
    "output_text",
    "output_audio",
)


def _usage_dict(row: UsageSummaryRow, prices: Prices) -> dict[str, Any]:
    d: dict[str, Any] = {f: getattr(row, f) for f in _TOKEN_FIELDS}
    d["cost_usd"] = round(prices.cost(row), 9)  # drop float noise; prices have few digits
    return d


def _sum_rows(rows: Sequence[UsageSummaryRow]) -> UsageSummaryRow:
    return UsageSummaryRow(
        "total",
        *(sum(getattr(r, f) for r in rows) for f in _TOKEN_FIELDS),
        sum(r.cached_text_est for r in rows),
        sum(r.cached_audio_est for r in rows),
    )


def usage_report(
    store: Store,
    prices: Prices,
    *,
    sessions: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Token usage per UTC day and per session, with totals and estimated costs (USD).

    Rows are the responses created in [``since``, ``until``) of ``sessions`` (all if empty).
    """
    days = store.usage_summary("day", sessions=sessions, since=since, until=until)
    per_session = store.usage_summary("session", sessions=sessions, since=since, until=until)
    return {
        "prices_usd_per_million": asdict(prices),
        "days": [{"day": r.key, **_usage_dict(r, prices)} for r in days],
        "sessions": [{"session_id": r.key, **_usage_dict(r, prices)} for r in per_session],
        "total": _usage_dict(_sum_rows(days), prices),
    }


_USAGE_HEADER = ("RESPONSES", "IN TEXT", "IN AUDIO", "IN CACHED", "OUT TEXT", "OUT AUDIO",
                 "COST USD")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]


def _usage_cells(d: dict[str, Any]) -> list[str]:
    return [*(str(d[f]) for f in _TOKEN_FIELDS), f"{d['cost_usd']:.4f}"]


def _price(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


def format_usage(report: dict[str, Any]) -> str:
    """The usage report as text: a table per day and per session, each with a total line."""
    if not report["days"]:
        return "no responses recorded in the selection\n"
    total = ["TOTAL", *_usage_cells(report["total"])]
    out = ["Token usage by day (UTC)"]
    out += _table(("DAY", *_USAGE_HEADER),
                  [[d["day"], *_usage_cells(d)] for d in report["days"]] + [total])
    out += ["", "Token usage by session"]
    out += _table(("SESSION", *_USAGE_HEADER),
                  [[s["session_id"], *_usage_cells(s)] for s in report["sessions"]] + [total])
    p = report["prices_usd_per_million"]
    out += [
        "",
        f"Prices, USD per 1M tokens (override with R2D2_PRICE_*): text in"
        f" {_price(p['text_in'])} (cached {_price(p['text_in_cached'])}),",
        f"audio in {_price(p['audio_in'])} (cached {_price(p['audio_in_cached'])}),"
        f" text out {_price(p['text_out'])}, audio out {_price(p['audio_out'])}.",
        "Costs are estimates: IN CACHED is part of IN TEXT + IN AUDIO; the database keeps only",
        "its total, so it is priced as text and audio in proportion to each response's input.",
    ]
    return "\n".join(out) + "\n"


def run_usage(
    db_path: str | os.PathLike[str],
    *,
    out: TextIO,
    settings: Any = None,
    fmt: str = "text",
    sessions: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Write the usage report of ``db_path`` to ``out``; returns the report dict.

    Prices come from ``settings`` (``price_*`` attributes) over the defaults.
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    _check_format(fmt)
    since_dt, until_dt = _time_range(since, until)
    prices = Prices.from_settings(settings)
    with Store.open(db_path, create=False) as store:
        _check_sessions(store, sessions)
        report = usage_report(store, prices, sessions=sessions, since=since_dt, until=until_dt)
    _write(out, report, fmt, format_usage)
    return report


# ---------------------------------------------------------------------------- stats


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


def stats_report(
    store: Store,
    *,
    sessions: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Latency percentiles, responses by status, interruptions, errors and summed counters.

    Responses, messages and errors count when created in [``since``, ``until``); session
    counters when the session started in it.
    """
    window = {"sessions": sessions, "since": since, "until": until}
    first_audio, first_played = store.response_latencies(**window)
    by_status = store.response_status_counts(**window)
    rows = store.session_stats(sessions, since, until)
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
        "interrupted_replies": store.count_interrupted(**window),
        "errors": store.count_errors(**window),
        "counters": counters,
        "reconnects": reconnects,
        "sessions_continuing_earlier": continued,
    }


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    out += _table(
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


def run_stats(
    db_path: str | os.PathLike[str],
    *,
    out: TextIO,
    fmt: str = "text",
    sessions: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Write the stats report of ``db_path`` to ``out``; returns the report dict.

    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    _check_format(fmt)
    since_dt, until_dt = _time_range(since, until)
    with Store.open(db_path, create=False) as store:
        _check_sessions(store, sessions)
        report = stats_report(store, sessions=sessions, since=since_dt, until=until_dt)
    _write(out, report, fmt, format_stats)
    return report


def _write(out: TextIO, report: dict[str, Any], fmt: str, text: Any) -> None:
    if fmt == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(text(report))
