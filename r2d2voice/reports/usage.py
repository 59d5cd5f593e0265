"""``usage``: token usage per UTC day and per session, with an estimated cost.

The report is a plain dict first (:func:`usage_report`); the text renderer only formats it, so
the JSON output and the table always agree. From a fleet server, each day and session row
carries ``device_id`` (a ``DEVICE`` column in the text), one row per robot; the total is the
selected robots' together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, TextIO

from r2d2voice.errors import UsageError
from r2d2voice.reports.source import FleetReader, open_records
from r2d2voice.reports.tables import check_format, table, time_range, write_report
from r2d2voice.storage.queries import Queries, UsageSummaryRow

__all__ = ["Prices", "format_usage", "usage_command", "usage_report"]

_MILLION = 1_000_000


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


def usage_command(db_path: str | os.PathLike[str], *, out: TextIO | None = None,
                  settings: Any = None, fmt: str = "text", sessions: Sequence[str] = (),
                  since: str | None = None, until: str | None = None,
                  devices: Sequence[str] = ()) -> dict[str, Any]:
    """The ``usage`` command: the report of ``db_path`` to ``out`` (stdout); returns it.
    ``db_path`` is a database file, or a fleet server URL (``devices``: only those robots).

    Prices come from ``settings`` (``price_*`` attributes) over the defaults.
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    check_format(fmt)
    since_dt, until_dt = time_range(since, until)
    prices = Prices.from_settings(settings)
    with open_records(db_path, devices) as records:
        records.check_sessions(sessions)
        report = usage_report(records.read, prices, sessions=sessions, since=since_dt,
                              until=until_dt)
    write_report(out if out is not None else sys.stdout, report, fmt, format_usage)
    return report


_TOKEN_FIELDS = ("responses", "input_text", "input_audio", "input_cached", "output_text",
                 "output_audio")


def _usage_dict(row: UsageSummaryRow, prices: Prices) -> dict[str, Any]:
    d: dict[str, Any] = {f: getattr(row, f) for f in _TOKEN_FIELDS}
    d["cost_usd"] = round(prices.cost(row), 9)  # drop float noise; prices have few digits
    return d


def _keyed(row: Any, key: str, prices: Prices, fleet: bool) -> dict[str, Any]:
    """One day or session row: ``key`` names the group (after ``device_id`` on a fleet)."""
    d: dict[str, Any] = {"device_id": row.device_id} if fleet else {}
    d[key] = row.key
    return d | _usage_dict(row, prices)


def _sum_rows(rows: Sequence[UsageSummaryRow]) -> UsageSummaryRow:
    return UsageSummaryRow(
        "total",
        *(sum(getattr(r, f) for r in rows) for f in _TOKEN_FIELDS),
        sum(r.cached_text_est for r in rows),
        sum(r.cached_audio_est for r in rows),
    )


def usage_report(read: Queries | FleetReader, prices: Prices, *,
                 sessions: Sequence[str] = (), since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, Any]:
    """Token usage per UTC day and per session (in order), with totals and estimated costs.

    Rows are the responses created in [``since``, ``until``) of ``sessions`` (all if empty);
    ``read`` is a database's queries or a fleet server's (rows per robot, ``device_id``).
    """
    fleet = isinstance(read, FleetReader)
    window = {"sessions": sessions, "since": since, "until": until}
    days = read.usage_summary("day", **window)
    per_session = read.usage_summary("session", **window)
    return {
        "prices_usd_per_million": asdict(prices),
        "days": [_keyed(r, "day", prices, fleet) for r in days],
        "sessions": [_keyed(r, "session_id", prices, fleet) for r in per_session],
        "total": _usage_dict(_sum_rows(days), prices),  # type: ignore[arg-type]
    }


_HEADER = ("RESPONSES", "IN TEXT", "IN AUDIO", "IN CACHED", "OUT TEXT", "OUT AUDIO", "COST USD")


def _cells(d: dict[str, Any]) -> list[str]:
    return [*(str(d[f]) for f in _TOKEN_FIELDS), f"{d['cost_usd']:.4f}"]


def _price(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


def format_usage(report: dict[str, Any]) -> str:
    """The usage report as text: a table per day and per session, each with a total line."""
    if not report["days"]:
        return "no responses recorded in the selection\n"
    fleet = "device_id" in report["days"][0]
    lead = ("DEVICE",) if fleet else ()

    def rows(group: list[dict[str, Any]], key: str) -> list[list[str]]:
        total = ["TOTAL", *[""] * len(lead), *_cells(report["total"])]
        return [[*([d["device_id"]] if fleet else []), d[key], *_cells(d)]
                for d in group] + [total]

    out = ["Token usage by day (UTC)"]
    out += table((*lead, "DAY", *_HEADER), rows(report["days"], "day"),
                 left=range(len(lead) + 1))
    out += ["", "Token usage by session"]
    out += table((*lead, "SESSION", *_HEADER), rows(report["sessions"], "session_id"),
                 left=range(len(lead) + 1))
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
