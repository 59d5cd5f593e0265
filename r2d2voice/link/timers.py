"""The watchers of one connection, each a task that waits on the run's state (never polls):
keepalive pings, recycling before the session limit, giving up on a late transcript, hanging up
after the goodbye, and ``STATUS=``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from r2d2voice.link.state import LinkPolicy, LinkState
from r2d2voice.link.transport import LinkClosed, Transport
from r2d2voice.protocol.core import End, EndReason

if TYPE_CHECKING:
    from r2d2voice.link.effects import Effects
    from r2d2voice.link.parts import LinkParts

log = logging.getLogger("r2d2voice.link.timers")

#: ends the connection for a reason (Connection.finish)
Finish = Callable[[EndReason], Awaitable[None]]


async def keepalive(transport: Transport, policy: LinkPolicy, finish: Finish) -> None:
    """A ping the service does not answer in time means the link is dead."""
    while True:
        await trio.sleep(policy.ping_interval)
        with trio.move_on_after(policy.ping_timeout) as waited:
            try:
                await transport.ping()
            except LinkClosed:
                return
        if waited.cancelled_caught:
            await finish(EndReason(End.LOST, "ping timeout"))
            return


async def recycle(state: LinkState, policy: LinkPolicy, finish: Finish) -> None:
    """Before the service's session limit, start a fresh session at a quiet moment: nothing
    open and no reply audio queued, for ``quiet_seconds`` in a row."""
    await trio.sleep(policy.session_max_seconds)
    log.info("session limit near: recycling the connection at the next quiet moment")

    def quiet() -> bool:
        return state.conversation.settled and state.buffer.queued_samples() == 0

    await state.hold(quiet, policy.quiet_seconds)
    await finish(EndReason(End.RECYCLE))


async def give_up_transcripts(state: LinkState, policy: LinkPolicy) -> None:
    """A user transcript still missing ``transcript_wait`` seconds after everything else was
    done never comes: stop waiting for it (it must not hold up a replay's end or recycling)."""
    conv = state.conversation
    while True:
        await state.watch.wait_for(lambda: conv.waiting_for_transcript)
        with trio.move_on_after(policy.transcript_wait) as waited:
            await state.watch.wait_for(lambda: not conv.waiting_for_transcript)
        if waited.cancelled_caught:
            items = conv.give_up_transcripts()
            log.warning("no transcript of %s within %.0f s: no longer waiting for it",
                        ", ".join(items), policy.transcript_wait)
            state.watch.changed()


async def hang_up(effects: Effects, finish: Finish) -> None:
    """After the goodbye (:class:`HangUp`), once the speaker has played it, close the session."""
    await effects.hang_up.wait()
    await effects.state.watch.wait_for(effects.speaker_drained)
    log.info("conversation ended by the robot (end_conversation): hanging up")
    await finish(EndReason(End.HANGUP))


async def status(state: LinkState, parts: LinkParts) -> None:
    """Keep STATUS= true, and tell the run whether a turn is open or a reply plays (the
    microphone hands audio over frame by frame then); the watch changes on every event and
    when the speaker starts or drains (repeats are skipped by the console)."""
    try:
        while True:
            parts.console.status(status_text(state))
            parts.busy(not state.conversation.idle or state.buffer.queued_samples() > 0)
            await state.watch.next_change()
    finally:
        parts.busy(False)


async def tick(state: LinkState, effects: Effects) -> None:
    """Time passing, for a core that needs it (one whose pauses close utterances)."""
    core = state.conversation
    if core.tick_interval is None:
        return
    while True:
        await trio.sleep(core.tick_interval)
        await effects.apply(core.tick(trio.current_time()))


def status_text(state: LinkState) -> str:
    """What the robot is doing, for ``systemctl status``."""
    return state.conversation.status(state.buffer.queued_samples() > 0)
