"""Budget caps on the estimated spend: per local calendar day and month, counted from the record.

The spend is the estimate ``usage`` shows (:func:`~r2d2voice.reports.usage.spend`, same
prices, same split of cached input), read from the database, so it survives restarts; a run
then adds each response's cost as it is recorded (:func:`response_cost`, the same formula
over the same columns).

:class:`BudgetState` is sans-IO: it holds the spend of the current day and month against
the caps and answers with events (:class:`Warned` at 80 %, :class:`Reached`,
:class:`Reopened` when the day or month turns) — no clocks of its own (``now`` is passed
in), no I/O. :func:`budget_from` builds one from a database's queries; :func:`read_spent`
reads the spend from a running store, which :meth:`BudgetState.count` takes in.

Periods are local calendar days and months (``tz``: None is the system's local time):
wall-clock time decides which day a response counts for, as it labels it. A board whose
clock is far off before NTP sets it counts what it spends then to that wrong day.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any

from r2d2voice.reports.usage import Prices, spend
from r2d2voice.storage.health import describe, is_transient
from r2d2voice.storage.queries import Queries, UsageSummaryRow
from r2d2voice.storage.writer import usage_columns

if TYPE_CHECKING:
    from r2d2voice.storage.recorder import AsyncStore

__all__ = [
    "CAPS",
    "BudgetEvent",
    "BudgetState",
    "Caps",
    "Reached",
    "Reopened",
    "Warned",
    "budget_from",
    "local_now",
    "money",
    "period_bounds",
    "read_spent",
    "response_cost",
    "spent_from",
]

log = logging.getLogger("r2d2voice.reports.budget")

#: The caps, in the order they are checked and shown.
CAPS = ("daily", "monthly")
#: Share of a cap that is warned about (once per cap and period).
WARN_AT = 0.8
#: Amounts closer than this count as equal (float sums of prices).
_EPSILON = 1e-9

Clock = Callable[[], datetime]


def local_now() -> datetime:
    """The wall clock in the system's local time (aware)."""
    return datetime.now().astimezone()


def money(usd: float) -> str:
    """``$1.00``; small amounts keep their cents' fractions (``$0.0042``)."""
    return f"${usd:.2f}" if usd >= 0.1 or usd == 0 else f"${usd:.4f}".rstrip("0")


@dataclass(frozen=True)
class Caps:
    """USD caps (None: no cap)."""

    daily: float | None = None
    monthly: float | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Caps:
        return cls(getattr(settings, "budget_daily_usd", None),
                   getattr(settings, "budget_monthly_usd", None))

    def of(self, cap: str) -> float | None:
        return self.daily if cap == "daily" else self.monthly

    @property
    def any(self) -> bool:
        return self.daily is not None or self.monthly is not None


def _midnight(day: date, tz: tzinfo | None) -> datetime:
    """The start of ``day`` in ``tz`` (None: the system's local time, with its DST rules)."""
    if tz is None:
        return datetime(day.year, day.month, day.day).astimezone()
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def period_bounds(cap: str, now: datetime, tz: tzinfo | None = None) -> tuple[datetime, datetime]:
    """[start, end) of the local day (``daily``) or month (``monthly``) holding ``now``."""
    local = now.astimezone(tz) if tz is not None else now.astimezone()
    first = local.date()
    if cap == "daily":
        nxt = date.fromordinal(first.toordinal() + 1)
    else:
        first = first.replace(day=1)
        nxt = (first.replace(year=first.year + 1, month=1) if first.month == 12
               else first.replace(month=first.month + 1))
    return _midnight(first, tz), _midnight(nxt, tz)


def response_cost(usage: dict[str, Any] | None, prices: Prices) -> float:
    """USD of one ``response.done`` usage object, exactly as ``usage`` prices its stored row
    (the same columns, the same split of cached input between text and audio)."""
    it, ia, ic, ot, oa = (n or 0 for n in usage_columns(usage))
    cached = min(ic, it + ia)
    share = (lambda part: cached * part / (it + ia)) if it + ia else (lambda part: 0.0)
    row = UsageSummaryRow("", 1, it, ia, ic, ot, oa, share(it), share(ia))
    return prices.cost(row)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Warned:
    """``cap`` passed :data:`WARN_AT` of its limit."""

    cap: str
    spent: float
    limit: float

    def message(self) -> str:
        return (f"{self.cap} budget: {money(self.spent)} of {money(self.limit)} spent "
                f"({self.spent / self.limit:.0%})")


@dataclass(frozen=True)
class Reached:
    """``cap`` is spent: no new session until ``reopens_at``."""

    cap: str
    spent: float
    limit: float
    reopens_at: datetime

    def message(self) -> str:
        return (f"{self.cap} budget reached ({money(self.spent)} of {money(self.limit)}): "
                f"no new session until {self.reopens_at:%Y-%m-%d %H:%M}")

    def back(self) -> str:
        """``back tomorrow`` / ``back on 1 December``: when the cap opens again."""
        if self.cap == "daily":
            return "back tomorrow"
        return f"back on {self.reopens_at.day} {self.reopens_at:%B}"


@dataclass(frozen=True)
class Reopened:
    """``cap``'s period turned: its spend starts again from 0."""

    cap: str


BudgetEvent = Warned | Reached | Reopened


# ----------------------------------------------------------------------------- state


@dataclass
class _Period:
    start: datetime
    end: datetime
    spent: float = 0.0
    warned: bool = False
    announced: bool = False


@dataclass
class BudgetState:
    """The spend of the current local day and month against ``caps`` (sans-IO).

    Build it with :meth:`start` (or :func:`budget_from`); feed it each response's cost with
    :meth:`add` and the time with :meth:`roll`; both return the events that happened. It is
    ``open`` while no cap is reached.
    """

    caps: Caps
    tz: tzinfo | None = None
    periods: dict[str, _Period] = field(default_factory=dict)

    @classmethod
    def start(cls, caps: Caps, spent: dict[str, float], now: datetime,
              tz: tzinfo | None = None) -> tuple[BudgetState, list[BudgetEvent]]:
        """The state at ``now`` with ``spent`` (``daily``/``monthly`` USD so far in the
        periods holding ``now``), and what it already says (80 % passed, a cap reached)."""
        state = cls(caps, tz)
        for cap in CAPS:
            start, end = period_bounds(cap, now, tz)
            state.periods[cap] = _Period(start, end, spent.get(cap, 0.0))
        return state, state._check()

    # -- reading ------------------------------------------------------------------------

    def spent(self, cap: str) -> float:
        return self.periods[cap].spent

    @property
    def reached(self) -> str | None:
        """The first reached cap (``daily`` / ``monthly``), or None."""
        for cap in CAPS:
            limit = self.caps.of(cap)
            if limit is not None and self.periods[cap].spent >= limit - _EPSILON:
                return cap
        return None

    @property
    def open(self) -> bool:
        return self.reached is None

    @property
    def remaining(self) -> float | None:
        """USD before the nearest cap (0 once reached); None without caps."""
        left = [limit - self.periods[cap].spent for cap in CAPS
                if (limit := self.caps.of(cap)) is not None]
        return max(0.0, min(left)) if left else None

    @property
    def reopens_at(self) -> datetime | None:
        """When every reached cap's period has turned (None while open)."""
        ends = [self.periods[cap].end for cap in CAPS
                if (limit := self.caps.of(cap)) is not None
                and self.periods[cap].spent >= limit - _EPSILON]
        return max(ends) if ends else None

    def reached_event(self) -> Reached | None:
        """The reached cap as an event (the one that stays closed longest), or None."""
        closed = [cap for cap in CAPS if (limit := self.caps.of(cap)) is not None
                  and self.periods[cap].spent >= limit - _EPSILON]
        if not closed:
            return None
        cap = max(closed, key=lambda c: self.periods[c].end)
        return Reached(cap, self.periods[cap].spent, self.caps.of(cap) or 0.0,
                       self.periods[cap].end)

    def status_text(self) -> str | None:
        """For ``STATUS=``: "daily budget reached ($1.00 of $1.00), back tomorrow"."""
        event = self.reached_event()
        if event is None:
            return None
        return (f"{event.cap} budget reached ({money(event.spent)} of {money(event.limit)}), "
                f"{event.back()}")

    def stopped_message(self, turns: int) -> str:
        """For a replay that stopped at the cap (its one line, exit 1)."""
        event = self.reached_event()
        cap = f"{event.cap} budget of {money(event.limit)}" if event else "budget"
        return (f"stopped: {cap} reached after {turns} turn{'s' if turns != 1 else ''}; "
                "what was said is stored")

    def closed_message(self) -> str:
        """For a replay started with the budget already spent (exit 1, nothing sent)."""
        event = self.reached_event()
        if event is None:
            return "the budget is open"
        when = "today" if event.cap == "daily" else "this month"
        return (f"{event.cap} budget of {money(event.limit)} already reached "
                f"({money(event.spent)} spent {when}): nothing was sent; {event.back()}")

    def snapshot(self) -> dict[str, Any]:
        """Each cap's period, spend, limit and state (the ``usage`` report's ``budget``)."""
        out: dict[str, Any] = {}
        for cap in CAPS:
            p, limit = self.periods[cap], self.caps.of(cap)
            reached = limit is not None and p.spent >= limit - _EPSILON
            out[cap] = {
                "period": p.start.strftime("%Y-%m-%d" if cap == "daily" else "%Y-%m"),
                "spent_usd": round(p.spent, 9),
                "cap_usd": limit,
                "remaining_usd": None if limit is None else round(max(0.0, limit - p.spent), 9),
                "reached": reached,
                "reopens_at": p.end.isoformat() if reached else None,
            }
        return out

    # -- feeding ------------------------------------------------------------------------

    def add(self, usd: float, now: datetime) -> list[BudgetEvent]:
        """A response cost ``usd`` at ``now``: the events it causes (after any period turn)."""
        events: list[BudgetEvent] = self.roll(now)
        for p in self.periods.values():
            p.spent += usd
        return events + self._check()

    def count(self, spent: dict[str, float]) -> list[BudgetEvent]:
        """The spend the record shows for the current periods (``daily``/``monthly`` USD):
        each period keeps the larger of it and what was added meanwhile (the record may not
        have the last responses yet); the events it causes."""
        for cap in CAPS:
            p = self.periods[cap]
            p.spent = max(p.spent, spent.get(cap, 0.0))
        return self._check()

    def roll(self, now: datetime) -> list[BudgetEvent]:
        """The periods that ``now`` is past start again from 0: a :class:`Reopened` each."""
        events: list[BudgetEvent] = []
        for cap in CAPS:
            p = self.periods[cap]
            if now >= p.end or now < p.start:  # the day turned (or the clock was stepped)
                start, end = period_bounds(cap, now, self.tz)
                self.periods[cap] = _Period(start, end)
                events.append(Reopened(cap))
        return events

    def _check(self) -> list[BudgetEvent]:
        """80 % passed (once per cap and period), a cap reached (once per cap and period)."""
        events: list[BudgetEvent] = []
        for cap in CAPS:
            p, limit = self.periods[cap], self.caps.of(cap)
            if limit is None:
                continue
            if not p.warned and p.spent >= WARN_AT * limit - _EPSILON:
                p.warned = True
                if p.spent < limit - _EPSILON:
                    events.append(Warned(cap, p.spent, limit))
            if not p.announced and p.spent >= limit - _EPSILON:
                p.announced = True
                events.append(Reached(cap, p.spent, limit, p.end))
        return events


# ----------------------------------------------------------------------------- reading


def spent_from(read: Queries, prices: Prices, now: datetime, *, bill_local: bool = False,
               tz: tzinfo | None = None) -> dict[str, float]:
    """USD of the responses recorded in the local day and month holding ``now``."""
    spent = {}
    for cap in CAPS:
        start, end = period_bounds(cap, now, tz)
        spent[cap] = spend(read, prices, since=start.astimezone(timezone.utc),
                           until=end.astimezone(timezone.utc), bill_local=bill_local)
    return spent


def budget_from(read: Queries, prices: Prices, caps: Caps, now: datetime, *,
                bill_local: bool = False,
                tz: tzinfo | None = None) -> tuple[BudgetState, list[BudgetEvent]]:
    """The budget at ``now`` from the responses recorded in this day and month."""
    return BudgetState.start(caps, spent_from(read, prices, now, bill_local=bill_local, tz=tz),
                             now, tz)


async def read_spent(store: AsyncStore, prices: Prices, now: datetime, *,
                     bill_local: bool = False, tz: tzinfo | None = None) -> dict[str, float]:
    """:func:`spent_from` over a running store (in its worker thread, after the writes
    queued before it). A database that cannot be read now counts as nothing spent, said in
    the log: the records that could not be written are counted once they are."""
    db = store.store
    if db is None:
        log.warning("budget: the database cannot be read now; counting what this run spends")
        return {}
    try:
        return await store.call(spent_from, db.read, prices, now, bill_local=bill_local, tz=tz)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("budget: the spend was not read (%s); counting what this run spends",
                    describe(exc))
        return {}
