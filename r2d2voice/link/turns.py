"""Typed waits the link offers the rest of a run: a file source asks "may the next turn go?"
and "was it answered?" (:class:`TurnGate`); the session gate asks "connected?", "quiet for N
s?" and "ended?" (:class:`LinkView`). Nobody outside the link reads its state."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import trio

from r2d2voice.link.state import LinkState


class Answer(enum.Enum):
    ANSWERED = "answered"
    NOT_HEARD = "not heard"  # the service did not notice the turn in time: go on
    NO_REPLY = "no reply"  # heard, but no reply in time: go on
    MOVED = "moved"  # the connection changed meanwhile: send the turn again
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A turn that may go now, on the connection ``epoch``."""

    epoch: int
    responses_done: int
    turns_committed: int


class LinkView:
    """The link's state as typed waits (read-only for everyone else)."""

    def __init__(self, state: LinkState) -> None:
        self._state = state

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def stopping(self) -> bool:
        return self._state.stopping

    async def wait_connected(self) -> None:
        state = self._state
        await state.watch.wait_for(lambda: state.connected or state.stopping)

    async def wait_disconnected(self) -> None:
        state = self._state
        await state.watch.wait_for(lambda: not state.connected)

    def quiet(self) -> bool:
        """Nothing open (no speech, reply, tool or transcript to come), nothing playing."""
        state = self._state
        return state.conversation.settled and state.buffer.queued_samples() == 0

    async def wait_quiet_for(self, seconds: float) -> None:
        """Until :meth:`quiet` has held for ``seconds`` in a row."""
        await self._state.hold(self.quiet, seconds)


class TurnGate(LinkView):
    """Turn-taking for a source that must never talk over the robot (a fast replay)."""

    async def next_turn(self) -> Ticket | None:
        """Once connected and idle; None when the run is stopping."""
        state = self._state
        await state.watch.wait_for(
            lambda: (state.connected and state.conversation.idle) or state.stopping)
        if state.stopping:
            return None
        conv = state.conversation
        return Ticket(state.epoch, conv.responses_done, conv.turns_committed)

    def still(self, ticket: Ticket) -> bool:
        """The connection the turn went to is still the current one."""
        return self._state.epoch == ticket.epoch

    async def answered(self, ticket: Ticket, notice: float, reply: float) -> Answer:
        """Wait for the service to notice the turn (``notice`` s) and answer it (``reply`` s)."""
        state = self._state

        def moved_on() -> bool:
            return state.stopping or state.epoch != ticket.epoch

        with trio.move_on_after(notice) as noticed:
            await state.watch.wait_for(
                lambda: moved_on() or state.conversation.turns_committed > ticket.turns_committed
                or state.conversation.user_speaking)
        if state.epoch != ticket.epoch:
            return Answer.STOPPING if state.stopping else Answer.MOVED
        if noticed.cancelled_caught:
            return Answer.NOT_HEARD
        with trio.move_on_after(reply) as waited:
            await state.watch.wait_for(
                lambda: moved_on() or (state.conversation.responses_done > ticket.responses_done
                                       and state.conversation.idle))
        answered = state.conversation.responses_done > ticket.responses_done
        if state.epoch != ticket.epoch and not answered:
            return Answer.STOPPING if state.stopping else Answer.MOVED
        return Answer.NO_REPLY if waited.cancelled_caught else Answer.ANSWERED
