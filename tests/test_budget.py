"""Budget caps, sans-IO and in a run's clock: the spend of a local calendar day and month is read
from the record (the estimate ``usage`` shows), 80 % is warned about once, a cap is reached
once, and the day or month turning reopens it — on an injected wall clock, and on trio's
MockClock for the wait."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from storage_support import SteppedClock, usage

from r2d2voice.reports.budget import (
    BudgetState,
    Caps,
    Reached,
    Reopened,
    Warned,
    budget_from,
    response_cost,
)
from r2d2voice.reports.usage import Prices, usage_command
from r2d2voice.storage.database import Store

BERLIN = ZoneInfo("Europe/Berlin")
#: 22:00 in Berlin on 30 March 2026 (CEST, UTC+2), two hours before the day turns
EVENING = datetime(2026, 3, 30, 22, 0, tzinfo=BERLIN)
#: Only audio out costs: 5,000 USD per 1M, so 20 tokens (1 s of reply) cost $0.10.
PRICES = Prices(audio_in=0, audio_in_cached=0, text_in=0, text_in_cached=0, audio_out=5000,
                text_out=0)
REPLY = usage(0, 0, 0, 0, 20)


def test_warned_at_80_percent_and_reached_once_then_the_day_turning_reopens() -> None:
    state, events = BudgetState.start(Caps(daily=0.5, monthly=1.0), {}, EVENING, BERLIN)
    assert events == [] and state.open and state.remaining == 0.5
    seen = [state.add(0.1, EVENING + timedelta(minutes=k)) for k in range(6)]
    assert seen[:3] == [[], [], []]
    assert seen[3] == [Warned("daily", 0.4, 0.5)]  # 80 %: once
    [reached] = seen[4]
    assert isinstance(reached, Reached) and reached.cap == "daily"
    assert seen[5] == []  # reached once, not again
    assert not state.open and state.reached == "daily" and state.remaining == 0
    assert state.reopens_at == datetime(2026, 3, 31, tzinfo=BERLIN)  # local midnight
    assert state.status_text() == "daily budget reached ($0.60 of $0.50), back tomorrow"
    assert state.stopped_message(5) == ("stopped: daily budget of $0.50 reached after 5 "
                                        "turns; what was said is stored")
    # still the same day one minute before midnight; the next day reopens
    assert state.roll(datetime(2026, 3, 30, 23, 59, tzinfo=BERLIN)) == []
    assert not state.open
    assert state.roll(datetime(2026, 3, 31, 0, 0, 1, tzinfo=BERLIN)) == [Reopened("daily")]
    assert state.open and state.spent("daily") == 0 and round(state.spent("monthly"), 9) == 0.6
    # the month keeps counting: at $1.00 this month it closes until 1 April
    at = datetime(2026, 3, 31, 9, tzinfo=BERLIN)
    events = [e for _ in range(4) for e in state.add(0.1, at)]
    # the month's 80 %, then with the fourth reply the day's 80 % and the month's cap
    assert [(type(e), e.cap) for e in events] == [(Warned, "monthly"), (Warned, "daily"),
                                                  (Reached, "monthly")]
    assert state.reached == "monthly"
    assert state.reopens_at == datetime(2026, 4, 1, tzinfo=BERLIN)
    assert state.status_text() == "monthly budget reached ($1.00 of $1.00), back on 1 April"
    assert state.roll(datetime(2026, 4, 1, 0, 0, 1, tzinfo=BERLIN)) == [Reopened("daily"),
                                                                         Reopened("monthly")]
    assert state.open


def _responses_at(path: Path, labels: list[datetime], *, backend: str = "openai") -> None:
    clock = SteppedClock(labels[0])
    with Store.open(path, now=clock) as store:
        sid = store.write.start_session(backend=backend, model="m", voice=None)
        for k, when in enumerate(labels):
            clock.set(when)
            store.write.record_response(sid, response_id=f"r{k}", status="completed",
                                        usage=REPLY)


def test_the_spend_is_read_from_the_record_per_local_day_and_month(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    utc = timezone.utc
    _responses_at(db, [
        datetime(2026, 2, 28, 12, tzinfo=utc),  # February: not this month
        datetime(2026, 3, 29, 21, 30, tzinfo=utc),  # 23:30 in Berlin on the 29th: yesterday
        datetime(2026, 3, 29, 22, 30, tzinfo=utc),  # 00:30 in Berlin on the 30th: today
        datetime(2026, 3, 30, 19, 0, tzinfo=utc),  # 21:00 in Berlin: today
    ])
    assert response_cost(REPLY, PRICES) == 0.1
    with Store.open(db, create=False) as store:
        state, events = budget_from(store.read, PRICES, Caps(daily=0.25), EVENING, tz=BERLIN)
    assert round(state.spent("daily"), 9) == 0.2 and round(state.spent("monthly"), 9) == 0.3
    assert events == [Warned("daily", state.spent("daily"), 0.25)]
    # a session on the local backend costs nothing, unless priced as if billed
    _responses_at(db, [datetime(2026, 3, 30, 19, 30, tzinfo=utc)], backend="local")
    with Store.open(db, create=False) as store:
        free, _ = budget_from(store.read, PRICES, Caps(daily=0.25), EVENING, tz=BERLIN)
        billed, _ = budget_from(store.read, PRICES, Caps(daily=0.25), EVENING, tz=BERLIN,
                                bill_local=True)
    assert round(free.spent("daily"), 9) == 0.2 and round(billed.spent("daily"), 9) == 0.3
    assert not billed.open and free.open


def test_usage_shows_today_and_this_month_against_the_caps(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    now = datetime.now().astimezone()
    noon = now.replace(hour=12, minute=0, second=0)  # today, whatever the time of the test
    _responses_at(db, [noon + timedelta(seconds=s) for s in (1, 2, 3)])
    settings = SimpleNamespace(**{f"price_{k}": v for k, v in vars(PRICES).items()},
                               budget_daily_usd=0.25, budget_monthly_usd=None, bill_local=False)
    out = io.StringIO()
    usage_command(db, out=out, settings=settings, fmt="json")
    report = json.loads(out.getvalue())
    daily, monthly = report["budget"]["daily"], report["budget"]["monthly"]
    assert daily["period"] == f"{now:%Y-%m-%d}" and monthly["period"] == f"{now:%Y-%m}"
    assert (daily["spent_usd"], daily["cap_usd"], daily["remaining_usd"]) == (0.3, 0.25, 0)
    tomorrow = f"{now + timedelta(days=1):%Y-%m-%d}"
    assert daily["reached"] and daily["reopens_at"].startswith(tomorrow)
    assert (monthly["spent_usd"], monthly["cap_usd"], monthly["reached"]) == (0.3, None, False)
    text = io.StringIO()
    usage_command(db, out=text, settings=settings)
    lines = text.getvalue().splitlines()
    start = lines.index("Budget (local time; R2D2_BUDGET_DAILY_USD, R2D2_BUDGET_MONTHLY_USD)")
    assert lines[start + 2].split() == ["today", f"{now:%Y-%m-%d}", "0.3000", "0.25", "0.0000",
                                        "reached,", "back", "tomorrow"]
    assert lines[start + 3].split()[-2:] == ["no", "cap"]
