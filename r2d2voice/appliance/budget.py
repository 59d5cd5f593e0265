"""The budget as a state of the session gate: :class:`BudgetGate` wraps a run's gate (``always``
or ``wake``, gate.py) and keeps conversations from opening while a cap is spent.

- Before each conversation it reads this local day's and month's spend from the record
  (``read``, over the run's store; what this run counted meanwhile is kept if larger). Spent:
  STATUS= says "daily budget reached ($1.00 of $1.00), back tomorrow", one WARNING is logged,
  and no conversation opens until the day or month turns (trio's clock sleeps towards it,
  looking at the wall clock at least every :data:`REOPEN_POLL_S`). Meanwhile a person who
  speaks (``always``: what the half-duplex echo gate lets through) or wakes it (``wake``)
  gets the sad beep and no connection, at most one every :data:`BEEP_GAP_S` (a television
  keeps talking). A file (``replay``) is not kept waiting: the run ends there.
- During a conversation each response's cost comes in as it is recorded (:meth:`spent`, from
  the records observer of ``watching.py``). At the cap no more microphone audio goes to the
  link; the reply in progress finishes (the link quiet, at most :data:`FINISH_S`), the sad beep
  plays and :meth:`wait_close` returns ``budget``: the session closes. At 80 % one warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from typing import Any

import trio

from r2d2voice.appliance.gate import Earcon
from r2d2voice.audio import earcons
from r2d2voice.link.state import Console, Opening
from r2d2voice.link.turns import LinkView
from r2d2voice.protocol.core import EndReason
from r2d2voice.reports.budget import (
    BudgetEvent,
    BudgetState,
    Caps,
    Reached,
    Reopened,
    Warned,
    local_now,
)
from r2d2voice.system.events import Events

__all__ = ["BUDGET", "BudgetGate", "billed"]

log = logging.getLogger("r2d2voice.appliance.budget")

#: the end of a conversation the budget closed (wait_close's reason, conversation_end)
BUDGET = "budget"
#: while closed, the wall clock is looked at this often (NTP may step it meanwhile)
REOPEN_POLL_S = 60.0
#: at most one sad beep this often (a television keeps talking)
BEEP_GAP_S = 10.0
#: at the cap, the reply in progress has this long to finish before the session closes
FINISH_S = 30.0
#: ... and the link must be quiet this long (nothing open, nothing left to play)
QUIET_S = 0.2

#: reads the spend the record shows for the day and month holding ``now`` ({} unknown)
SpendReader = Callable[[datetime], Awaitable[dict[str, float]]]


def billed(settings: Any) -> bool:
    """Whether this run's responses cost money: not on the local backend, unless
    ``R2D2_BILL_LOCAL`` prices it as if billed."""
    return settings.backend != "local" or settings.bill_local


class BudgetGate:
    """``inner`` while the budget is open (see the module). ``now``: the local wall clock."""

    def __init__(self, inner: Any, caps: Caps, *, live: bool, console: Console,
                 earcons: bool = True, now: Callable[[], datetime] = local_now,
                 tz: tzinfo | None = None, events: Events | None = None) -> None:
        self.inner = inner
        #: the run's event stream: ``budget {spent, cap}`` after each response's cost
        self.events = events or Events()
        self.live = live
        self.console = console
        self.earcons = earcons
        self.now = now
        self.state, _ = BudgetState.start(caps, {}, now(), tz)  # until the record is read
        #: the spend in the record (set once the run's store is open)
        self.read: SpendReader | None = None
        #: the budget ended a run over a file: "before" any conversation, or "at the cap"
        self.stop: str | None = None
        #: called when the budget closes (its status text) and opens again (None)
        self.on_change: Callable[[str | None], None] | None = None
        self.beeps = 0
        self._link: LinkView | None = None
        self._earcon: Earcon | None = None
        self._closed = False  # no microphone audio goes to the link
        self._reached = trio.Event()  # a cap was reached in the conversation in progress
        self._opened = 0  # conversations opened
        self._in_conversation = False
        self._input_ended = False
        self._waiting: trio.CancelScope | None = None
        self._last_beep = -math.inf

    # -- what the run calls -------------------------------------------------------------

    def attach(self, link: LinkView, earcon: Earcon) -> None:
        self._link = link
        if self.earcons:
            self._earcon = earcon
        self.inner.attach(link, earcon)

    def spent(self, usd: float) -> None:
        """A response cost ``usd`` (as it is recorded): at the cap the conversation closes."""
        self._say(self.state.add(usd, self.now()))
        self._tell()
        if not self.state.open and not self._closed:
            self._closed = True
            if self._in_conversation:
                self._reached.set()
                if not self.live:
                    self.stop = "at the cap"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting_status(self) -> str:
        return self.inner.waiting_status

    # -- the microphone chain -------------------------------------------------------------

    @property
    def conversing(self) -> bool:
        return self.inner.conversing

    def route(self, frame: bytes, passed: list[bytes], index: int) -> list[bytes]:
        if not self._closed:
            return self.inner.route(frame, passed, index)
        if self._in_conversation:  # the reply in progress finishes; nothing more is sent
            return []
        # what the echo gate let through: the robot's own sad beep is not someone speaking
        for kept in passed:
            who = self.inner.heard(kept)
            if who is not None:
                log.info("%s while the %s budget is spent: no connection", _said(who),
                         self.state.reached or "")
                self._beep(limited=True)
        return []

    def input_ended(self) -> None:
        self._input_ended = True
        self.inner.input_ended()
        if self._waiting is not None:
            self._waiting.cancel()

    # -- the supervisor -------------------------------------------------------------------

    async def wait_open(self) -> Opening | None:
        await self._refresh()
        while not self.state.open:
            self._close()
            if not self.live:  # a file is not kept until tomorrow: the run ends here
                self.stop = self.stop or ("at the cap" if self._opened else "before")
                return None
            if not await self._until_turned():
                return None  # the input ended (the run stops)
            await self._refresh()
        if self._closed:
            self._closed = False
            log.info("budget open again: conversations may start")
            self.console.status(self.inner.waiting_status)
            if self.on_change is not None:
                self.on_change(None)
        self._reached = trio.Event()
        opening = await self.inner.wait_open()
        if opening is not None:
            self._opened += 1
            self._in_conversation = True
        return opening

    def take_preroll(self) -> list[bytes] | None:
        return self.inner.take_preroll()

    async def wait_close(self) -> str:
        """The inner gate's close, or the budget's once the reply in progress is done."""
        reason: str | None = None
        async with trio.open_nursery() as nursery:

            async def first(wait: Callable[[], Awaitable[str]]) -> None:
                nonlocal reason
                got = await wait()
                reason = reason or got
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, self.inner.wait_close)
            nursery.start_soon(first, self._budget_close)
        assert reason is not None
        return reason

    def ended(self, reason: EndReason) -> bool:
        return self.inner.ended(reason)

    async def over(self, session_ids: list[str]) -> None:
        self._in_conversation = False
        await self.inner.over(session_ids)

    # -- inside ---------------------------------------------------------------------------

    async def _budget_close(self) -> str:
        await self._reached.wait()
        log.info("budget reached: the session closes once the reply in progress is done")
        if self._link is not None:
            with trio.move_on_after(FINISH_S):
                await self._link.wait_quiet_for(QUIET_S)
        self.inner.closed_by(BUDGET)
        self._beep(limited=False)
        return BUDGET

    async def _refresh(self) -> None:
        """The wall clock's day and month, and the spend the record shows for them."""
        now = self.now()
        self._say(self.state.roll(now))
        if self.read is not None:
            self._say(self.state.count(await self.read(now)))

    def _close(self) -> None:
        """Closed until the period turns: said in STATUS= (and to ``on_change``)."""
        self._closed = True
        text = self.state.status_text() or "budget reached"
        self.console.status(text)
        if self.on_change is not None:
            self.on_change(text)

    async def _until_turned(self) -> bool:
        """Until the reached caps' periods have turned (False: the input ended first)."""
        with trio.CancelScope() as scope:
            self._waiting = scope
            if self._input_ended:
                scope.cancel()
            while (reopens := self.state.reopens_at) is not None:
                left = (reopens - self.now()).total_seconds()
                await trio.sleep(min(REOPEN_POLL_S, max(left, 0.0) + 0.001))
                self._say(self.state.roll(self.now()))
        self._waiting = None
        return not scope.cancelled_caught

    def _tell(self) -> None:
        """``budget {spent, cap}`` of the cap nearest to being reached (USD)."""
        shares = [(self.state.spent(cap) / limit, cap, limit) for cap in ("daily", "monthly")
                  if (limit := self.state.caps.of(cap))]
        if shares:
            _, cap, limit = max(shares)
            self.events.emit("budget", spent=round(self.state.spent(cap), 6), cap=limit)

    def _beep(self, *, limited: bool) -> None:
        """The sad beep; ``limited``: at most one each :data:`BEEP_GAP_S` (refusals)."""
        if limited:
            now = trio.current_time()
            if now - self._last_beep < BEEP_GAP_S:
                return
            self._last_beep = now
        self.beeps += 1
        if self._earcon is not None:
            self._earcon("sad", earcons.sad())

    def _say(self, events: list[BudgetEvent]) -> None:
        for event in events:
            if isinstance(event, Warned) or (isinstance(event, Reached) and self.live):
                log.warning("%s", event.message())  # a replay's error line says it is reached
            elif isinstance(event, Reopened) and self.state.caps.of(event.cap) is not None:
                log.info("%s budget: a new %s, spending again", event.cap,
                         "day" if event.cap == "daily" else "month")


def _said(who: str) -> str:
    return {"speech": "someone spoke", "word": "the wake word was heard",
            "external": "woken from outside"}.get(who, who)
