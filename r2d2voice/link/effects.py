"""Carries out the protocol core's actions: audio to the speaker channel, records to the
recorder channel, client events to the uplink, barge-in on the playout buffer, function calls
to the tool runner, the hang-up to the connection, the turn's moments to the event stream
(``link/moments.py``).

Channel policies (the channels are made in ``appliance/pipeline.py`` and ``link/``): audio
never waits (a full channel drops the chunk and counts it); records wait and log that they
waited; control events and tool calls wait (they are few and small).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import trio

from r2d2voice.audio.playout import AudioChunk
from r2d2voice.link.parts import LinkParts
from r2d2voice.link.state import LinkState
from r2d2voice.link.tools import ToolJob
from r2d2voice.protocol.actions import (
    Action,
    AudioDone,
    BargeIn,
    CallTool,
    HangUp,
    Notice,
    Play,
    Record,
    Send,
    StoreError,
    StoreMessage,
    StoreResponse,
    UserSpeaking,
    UserStopped,
)
from r2d2voice.realtime.client_events import RATE, ClientEvent

log = logging.getLogger("r2d2voice.link.effects")


class Effects:
    """The action router of one connection (one service session)."""

    def __init__(self, state: LinkState, session_id: str, parts: LinkParts,
                 audio: trio.MemorySendChannel[AudioChunk],
                 records: trio.MemorySendChannel[tuple[str, Record]],
                 control: trio.MemorySendChannel[ClientEvent],
                 calls: trio.MemorySendChannel[ToolJob] | None = None, epoch: int = 0) -> None:
        self.state = state
        self.session_id = session_id
        self.console = parts.console
        self.observe = parts.on_record
        self.audio = audio
        self.records = records
        self.control = control
        self.calls = calls
        self.epoch = epoch
        #: told each final user transcript (a call waiting for the person's yes)
        self.heard = parts.offer.heard if parts.offer is not None else None
        #: set by :class:`HangUp`: the connection closes once the goodbye has played
        self.hang_up = trio.Event()

    async def apply(self, actions: list[Action]) -> None:
        state = self.state
        for action in actions:
            if isinstance(action, Play):
                self._play(action)
            elif isinstance(action, BargeIn):
                await self._barge_in()
            elif isinstance(action, UserSpeaking):
                state.moments.user_speaking()
            elif isinstance(action, UserStopped):
                state.moments.user_stopped()
            elif isinstance(action, AudioDone):
                state.moments.audio_done(action.item_id)
            elif isinstance(action, Send):
                await self._send(action.event)
            elif isinstance(action, CallTool):
                await self._call(action)
            elif isinstance(action, HangUp):
                self.hang_up.set()
            elif isinstance(action, Notice):
                log.info("%s", action.text)
            else:
                self._count(action)
                await self.store(action)
        state.watch.changed()

    async def store(self, record: Record, session_id: str | None = None) -> None:
        """Queue a record (of this session, or of ``session_id``) for the recorder; wait (and
        say so) when it is behind."""
        item = (session_id or self.session_id, record)
        self.observe(record)  # before any wait: the budget counts a reply as it is done
        try:
            self.records.send_nowait(item)
        except trio.WouldBlock:
            self.state.stats.record_waits += 1
            log.warning("recorder is behind (%d records queued): waiting for it",
                        self.records.statistics().max_buffer_size)
            await self.records.send(item)

    def speaker_drained(self) -> bool:
        """Nothing of the replies is left to play (neither queued nor on its way)."""
        return (self.state.buffer.queued_samples() == 0
                and self.audio.statistics().current_buffer_used == 0)

    def played_latencies(self) -> list[Action]:
        """Latency records for replies whose first sample the speaker has taken by now.

        The buffer stamps on its own clock (the audio thread cannot read trio's); a stamp
        becomes trio time by the time elapsed since it, read on the buffer's clock.
        """
        state = self.state
        conv, buffer = state.conversation, state.buffer
        out: list[Action] = []
        for item_id in list(conv.awaiting_play):
            at = buffer.first_played_at(item_id)
            if at is not None:
                now = trio.current_time() - (buffer.clock() - at)
                out += conv.first_played(item_id, now)
        return out

    async def _send(self, event: ClientEvent) -> None:
        """Queue a control event for the uplink; once the uplink is gone (the link died) it
        is dropped: the items it names belong to that dead session."""
        try:
            await self.control.send(event)
        except trio.BrokenResourceError:
            log.debug("link gone: %s not sent", event.TYPE)

    async def _call(self, call: CallTool) -> None:
        """Hand a function call to the tool runner (it starts at once in its own task)."""
        self.state.stats.tool_calls += 1
        log.info("tool call %s: %s", call.call_id, call.name)
        if self.calls is None:
            raise RuntimeError("a tool call without a tool runner")
        await self.calls.send(ToolJob(call, self.session_id, self.epoch))

    def _play(self, action: Play) -> None:
        state = self.state
        pcm = np.frombuffer(action.pcm, dtype="<i2")
        try:
            self.audio.send_nowait(AudioChunk(action.item_id, pcm))
        except trio.WouldBlock:
            state.stats.audio_chunks_dropped += 1
            return
        state.moments.queued(action.item_id, len(pcm))

    async def _barge_in(self) -> None:
        """Stop the reply the speaker is playing; the core decides what the service hears."""
        buffer = self.state.buffer
        item = buffer.playing_item()
        if item is None:
            return
        buffer.cancel(item)
        self.state.moments.cut(item)
        self.state.stats.interruptions += 1
        played = buffer.played_samples(item)
        log.info("barge-in: reply %s stopped after %.2f s", item, played / RATE)
        await self.apply(self.state.conversation.interrupted(item, played))

    def _count(self, record: Record) -> None:
        stats, moments = self.state.stats, self.state.moments
        if isinstance(record, StoreMessage) and not record.partial:
            if record.role == "user":
                stats.user_turns += 1
                if self.heard is not None:
                    self.heard(record.text, record.seq)
            else:
                stats.assistant_turns += 1
            self.console.transcript(record.role, record.text)
            moments.emit("transcript", role=record.role, text=record.text)
        elif isinstance(record, StoreError):
            stats.service_errors += 1
            moments.emit("error", message=record.message)
            # a fatal one ends the run with its own one-line error
            log.log(logging.DEBUG if record.fatal else logging.WARNING, "service error %s%s: %s",
                    record.type, f" ({record.code})" if record.code else "", record.message)
        elif isinstance(record, StoreResponse) and record.status == "in_progress":
            moments.response_started()
        elif isinstance(record, StoreResponse) and record.status in ("failed", "incomplete"):
            log.warning("reply %s %s: %s", record.response_id, record.status,
                        _reason(record.status_details))


def _reason(details: dict[str, Any] | None) -> str:
    """What ``status_details`` says went wrong, in a few words."""
    details = details or {}
    error = details.get("error")
    if isinstance(error, dict):
        return f"{error.get('code') or error.get('type')}: {error.get('message', '')}".strip()
    return str(details.get("reason") or "no reason given")
