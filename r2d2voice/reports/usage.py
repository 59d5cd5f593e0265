"""``usage``: token usage per UTC day and per session, with an estimated cost.

The report is a plain dict first (:func:`usage_report`); the text renderer only formats it, so
the JSON output and the table always agree. From a fleet server, each day and session row
carries ``device_id`` (a ``DEVICE`` column in the text), one row per robot; the total is the
selected robots' together.

Responses of sessions on the local backend (``sessions.backend`` or ``model`` "local": the
local backend names that model, whatever URL reached it) show their tokens but cost 0, as no
service bills them: ``local_responses`` counts them in each row, and the text marks them
"local backend: not billed" — unless ``R2D2_BILL_LOCAL`` is on, which prices them as if billed
(to rehearse a budget offline).

Sessions billed by the second (GPT-Live) add ``live_seconds`` — the service's own total for
each session, never a sum of its updates — priced at ``R2D2_PRICE_LIVE_MINUTE`` per minute,
plus the tokens of the Responses model they delegate to (at the text prices).

From a robot's own database the report also has ``budget``: this local day's and month's spend
against ``R2D2_BUDGET_DAILY_USD`` / ``R2D2_BUDGET_MONTHLY_USD`` (see :mod:`.budget`), whatever
the selection.
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
from r2d2voice.system.config import default

__all__ = ["NOT_BILLED", "Prices", "format_usage", "spend", "usage_command", "usage_report"]

_MILLION = 1_000_000


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens (and per minute of a GPT-Live session: ``live_minute``).

    The defaults are the published prices of gpt-realtime-class models when this was written.
    They are defaults to override, not facts: published prices change, so set
    R2D2_PRICE_AUDIO_IN, R2D2_PRICE_AUDIO_IN_CACHED, R2D2_PRICE_TEXT_IN,
    R2D2_PRICE_TEXT_IN_CACHED, R2D2_PRICE_AUDIO_OUT, R2D2_PRICE_TEXT_OUT (environment or env
    file) to the current ones, and R2D2_PRICE_LIVE_MINUTE.
    """

    audio_in: float = default("price_audio_in")
    audio_in_cached: float = default("price_audio_in_cached")
    text_in: float = default("price_text_in")
    text_in_cached: float = default("price_text_in_cached")
    audio_out: float = default("price_audio_out")
    text_out: float = default("price_text_out")
    #: USD per minute of a session billed by the second (GPT-Live), not per token
    live_minute: float = default("price_live_minute")

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
        ) / _MILLION + row.live_seconds / 60 * self.live_minute

    def per_million(self) -> dict[str, float]:
        """The token prices (USD per 1M tokens)."""
        return {k: v for k, v in asdict(self).items() if k != "live_minute"}


def usage_command(db_path: str | os.PathLike[str], *, out: TextIO | None = None,
                  settings: Any = None, fmt: str = "text", sessions: Sequence[str] = (),
                  since: str | None = None, until: str | None = None,
                  devices: Sequence[str] = ()) -> dict[str, Any]:
    """The ``usage`` command: the report of ``db_path`` to ``out`` (stdout); returns it.
    ``db_path`` is a database file, or a fleet server URL (``devices``: only those robots).

    Prices, ``bill_local`` and the budget caps come from ``settings`` over the defaults; the
    budget's day and month are the local time's now.
    Raises :class:`UsageError` for a bad option or a missing / non-r2d2voice database.
    """
    from r2d2voice.reports.budget import Caps, budget_from, local_now

    check_format(fmt)
    since_dt, until_dt = time_range(since, until)
    prices = Prices.from_settings(settings)
    bill_local = bool(getattr(settings, "bill_local", False))
    with open_records(db_path, devices) as records:
        records.check_sessions(sessions)
        report = usage_report(records.read, prices, sessions=sessions, since=since_dt,
                              until=until_dt, bill_local=bill_local)
        if isinstance(records.read, Queries):  # a robot's own budget, not a fleet's
            state, _ = budget_from(records.read, prices, Caps.from_settings(settings),
                                   local_now(), bill_local=bill_local)
            report["budget"] = state.snapshot()
    write_report(out if out is not None else sys.stdout, report, fmt, format_usage)
    return report


_TOKEN_FIELDS = ("responses", "input_text", "input_audio", "input_cached", "output_text",
                 "output_audio")
#: What a row priced at 0 because it ran on the local backend says in the text table.
NOT_BILLED = "local backend: not billed"

AnyUsageRow = Any  # a UsageSummaryRow, or its fleet twin (``device_id`` first)


def _grouped(rows: Sequence[AnyUsageRow], key: str, prices: Prices, fleet: bool,
             bill_local: bool = False) -> list[dict[str, Any]]:
    """One dict per group (``key`` names it, after ``device_id`` on a fleet), in order: the
    billed and local-backend rows of a group added up; local responses cost 0 (unless
    ``bill_local``)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        device = row.device_id if fleet else ""
        d = out.get((device, row.key))
        if d is None:
            d = out[(device, row.key)] = {"device_id": device} if fleet else {}
            d |= {key: row.key, **_zero()}
        tokens = [getattr(row, f) for f in _TOKEN_FIELDS]
        if row.local and not bill_local:
            _add(d, tokens, row.live_seconds, 0.0, (row.responses, row.live_seconds))
        else:
            _add(d, tokens, row.live_seconds, prices.cost(row), (0, 0.0))
    return [_rounded(d) for d in out.values()]


def _zero() -> dict[str, Any]:
    return {**dict.fromkeys(_TOKEN_FIELDS, 0), "live_seconds": 0.0, "cost_usd": 0.0,
            "local_responses": 0, "local_live_seconds": 0.0}


def _add(d: dict[str, Any], tokens: Sequence[int], live_seconds: float, cost: float,
         local: tuple[int, float]) -> None:
    """Add a row: its tokens, billed seconds, cost and (responses, seconds) not billed."""
    for f, n in zip(_TOKEN_FIELDS, tokens, strict=True):
        d[f] += n
    d["live_seconds"] += live_seconds
    d["cost_usd"] += cost
    d["local_responses"] += local[0]
    d["local_live_seconds"] += local[1]


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    # drop float noise; prices have few digits, billed time is whole seconds
    return d | {"cost_usd": round(d["cost_usd"], 9), "live_seconds": round(d["live_seconds"], 3),
                "local_live_seconds": round(d["local_live_seconds"], 3)}


def _total(days: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total = _zero()
    for d in days:
        _add(total, [d[f] for f in _TOKEN_FIELDS], d["live_seconds"], d["cost_usd"],
             (d["local_responses"], d["local_live_seconds"]))
    return _rounded(total)


def spend(read: Queries | FleetReader, prices: Prices, *, since: datetime | None = None,
          until: datetime | None = None, bill_local: bool = False) -> float:
    """Estimated USD of the responses created in [``since``, ``until``): the ``cost_usd``
    total :func:`usage_report` shows for that window."""
    days = _grouped(read.usage_summary("day", since=since, until=until), "day", prices,
                    isinstance(read, FleetReader), bill_local)
    return _total(days)["cost_usd"]


def usage_report(read: Queries | FleetReader, prices: Prices, *,
                 sessions: Sequence[str] = (), since: datetime | None = None,
                 until: datetime | None = None, bill_local: bool = False) -> dict[str, Any]:
    """Token usage per UTC day and per session (in order), with totals and estimated costs.

    Rows are the responses created in [``since``, ``until``) of ``sessions`` (all if empty);
    ``read`` is a database's queries or a fleet server's (rows per robot, ``device_id``).
    Responses of sessions on the local backend keep their tokens but cost 0 (no service
    bills them): ``local_responses`` counts them in each row. ``bill_local`` prices them as
    the others.
    """
    fleet = isinstance(read, FleetReader)
    window = {"sessions": sessions, "since": since, "until": until}
    days = _grouped(read.usage_summary("day", **window), "day", prices, fleet, bill_local)
    per_session = _grouped(read.usage_summary("session", **window), "session_id", prices,
                           fleet, bill_local)
    return {
        "prices_usd_per_million": prices.per_million(),
        "price_live_usd_per_minute": prices.live_minute,
        "bill_local": bill_local,
        "days": days,
        "sessions": per_session,
        "total": _total(days),
    }


_HEADER = ("RESPONSES", "IN TEXT", "IN AUDIO", "IN CACHED", "OUT TEXT", "OUT AUDIO")


def _cells(d: dict[str, Any], live: bool) -> list[str]:
    seconds = [f"{d['live_seconds']:g}"] if live else []
    return [*(str(d[f]) for f in _TOKEN_FIELDS), *seconds, f"{d['cost_usd']:.4f}"]


def _note(d: dict[str, Any]) -> str:
    local, seconds = d["local_responses"], d["local_live_seconds"]
    if not local and not seconds:
        return ""
    if local == d["responses"] and seconds == d["live_seconds"]:
        return NOT_BILLED
    parts = [f"{local} of them" if local else "", f"{seconds:g} s" if seconds else ""]
    return f"{' and '.join(p for p in parts if p)} {NOT_BILLED}"


def _price(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


def format_usage(report: dict[str, Any]) -> str:
    """The usage report as text: a table per day and per session, each with a total line;
    a NOTE column marks rows priced at 0 because they ran on the local backend; then the
    budget (today and this month against the caps)."""
    budget = _budget_lines(report["budget"]) if _capped(report) else []
    if not report["days"]:
        return "\n".join(["no responses recorded in the selection", *budget]) + "\n"
    fleet = "device_id" in report["days"][0]
    lead = ("DEVICE",) if fleet else ()
    total = report["total"]
    notes = total["local_responses"] > 0 or total["local_live_seconds"] > 0
    live = total["live_seconds"] > 0
    header = (*_HEADER, *(["LIVE S"] if live else []), "COST USD", *(["NOTE"] if notes else []))
    left = [*range(len(lead) + 1), len(lead) + len(header)] if notes else range(len(lead) + 1)

    def line(first: list[str], d: dict[str, Any]) -> list[str]:
        return [*first, *_cells(d, live), *([_note(d)] if notes else [])]

    def rows(group: list[dict[str, Any]], key: str) -> list[list[str]]:
        total = line(["TOTAL", *[""] * len(lead)], report["total"])
        return [line([*([d["device_id"]] if fleet else []), d[key]], d) for d in group] + [total]

    out = ["Token usage by day (UTC)"]
    out += table((*lead, "DAY", *header), rows(report["days"], "day"), left=left)
    out += ["", "Token usage by session"]
    out += table((*lead, "SESSION", *header), rows(report["sessions"], "session_id"), left=left)
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
    if live:
        out.append(f"GPT-Live sessions: LIVE S is the service's billed time, at USD "
                   f"{_price(report['price_live_usd_per_minute'])} a minute "
                   "(R2D2_PRICE_LIVE_MINUTE); their tokens are the delegated model's.")
    if notes:
        out.append("Responses of sessions on the local backend are counted but cost 0: no "
                   "service bills them.")
    if report.get("bill_local"):
        out.append("Sessions on the local backend are priced as if billed (R2D2_BILL_LOCAL).")
    return "\n".join([*out, *budget]) + "\n"


def _capped(report: dict[str, Any]) -> bool:
    """The report has a robot's budget with a cap (the text shows it only then)."""
    budget = report.get("budget") or {}
    return any(b["cap_usd"] is not None for b in budget.values())


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    """Today's and this month's spend against the caps, as a small table."""
    rows = []
    for cap, name in (("daily", "today"), ("monthly", "this month")):
        b = budget[cap]
        limit = b["cap_usd"]
        if limit is None:
            state = "no cap"
        elif b["reached"]:
            back = "tomorrow" if cap == "daily" else f"on {b['reopens_at'][:10]}"
            state = f"reached, back {back}"
        else:
            state = f"{b['spent_usd'] / limit:.0%} spent"
        rows.append([name, b["period"], f"{b['spent_usd']:.4f}",
                     "-" if limit is None else f"{limit:.2f}",
                     "-" if limit is None else f"{b['remaining_usd']:.4f}", state])
    return ["", "Budget (local time; R2D2_BUDGET_DAILY_USD, R2D2_BUDGET_MONTHLY_USD)",
            *table(("", "PERIOD", "SPENT USD", "CAP USD", "LEFT USD", "STATE"), rows,
                   left=(0, 1, 5))]
