"""Streaming one reply to the connection's sender, paced on trio's clock."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.fault_events import junk_frames
from r2d2voice.localbackend.reply import Reply, Tick, leftover_audio, synthesize
from r2d2voice.localbackend.session import LocalSession
from r2d2voice.localbackend.wire import RATE, Json

__all__ = ["Outgoing", "stream_reply"]

log = logging.getLogger("r2d2voice.localbackend.streaming")

Outgoing = Json | str | bytes
"""What the sender writes: an event (JSON text), or a raw text/binary frame (fault injection)."""


async def stream_reply(
    session: LocalSession,
    reply: Reply,
    out: trio.MemorySendChannel[Outgoing],
    config: BackendConfig,
    scope: trio.CancelScope | None = None,
) -> None:
    """Send one reply to ``out``: the faults' junk and delay, ``response.created``, the output
    items with the audio paced at ``config.realtime_factor`` on trio's clock; cancelling
    ``scope`` stops it (the leftover audio deltas of :attr:`Faults.leftover_audio_deltas`
    still go out), and either way its closing events follow."""
    faults = config.faults
    steps: Iterator[Json | Tick] | None = None
    with scope or trio.CancelScope():
        if faults.junk:
            for junk in junk_frames(session.event):
                await out.send(junk)
        if faults.reply_delay_s > 0:
            await trio.sleep(faults.reply_delay_s)
        for event in reply.opening():
            await out.send(event)
            reply.sent(event)
        beeps = None
        if reply.speaks:
            beeps = await trio.to_thread.run_sync(
                synthesize, reply.seed, reply.seconds, abandon_on_cancel=True)
        steps = reply.steps(beeps, config.chunk_ms_range)
        start = trio.current_time()
        for step in steps:
            if isinstance(step, Tick):
                await trio.sleep_until(start + step.at_ms / 1000 / config.realtime_factor)
            else:
                await out.send(step)
                reply.sent(step)
    if steps is not None and reply.cancel_reason is not None:
        for event in leftover_audio(steps, faults.leftover_audio_deltas):
            await out.send(event)  # not reply.sent: the cancelled item does not hold them
    session.finish_reply(reply)
    log.info("response %s %s after %.2f s of audio", reply.id, reply.status,
             reply.bytes_sent / 2 / RATE)
    for event in reply.closing():
        await out.send(event)
