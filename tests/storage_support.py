"""Helpers for the storage and report tests: a wall clock the test steps by hand."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

T0 = datetime(2025, 11, 21, 9, 30, 0, tzinfo=timezone.utc)


class SteppedClock:
    """A writer's wall clock (``now``) that moves only when the test says so."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when

    def step(self, **delta: float) -> None:
        """Jump by ``timedelta(**delta)``, forward or back (NTP stepping a board's clock)."""
        self.now += timedelta(**delta)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)
