"""A WAV file as microphone and a WAV file as speaker, for ``r2d2voice replay``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from r2d2voice.appliance.pipeline import Context
from r2d2voice.audio.files import WavWriter
from r2d2voice.audio.pcm import FRAME_BYTES, FRAME_SAMPLES, RATE
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.audio.vad import Turn, find_turns
from r2d2voice.realtime import protocol as p

log = logging.getLogger("r2d2voice.appliance.replay")

#: Extra silence after the service's VAD window, so the last turn surely closes.
TAIL_MARGIN_MS = 700
#: In fast mode, how long to wait for the service to notice a turn before moving on anyway.
NOTICE_TIMEOUT = 3.0


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


class FileSource:
    """Streams a recording as 20 ms frames, followed by silence that closes the last turn.

    ``realtime`` paces frames at 20 ms (a person talking, who may talk over the robot).
    Fast mode goes as fast as the conversation allows but never faster: after each turn it
    waits until the reply has come, so later audio never interrupts an earlier reply.
    Channel policy: a full channel makes this source wait (a replay loses nothing).
    """

    live = False

    @property
    def resends(self) -> bool:
        """Fast mode sends a turn again when its link died: queued frames are stale then."""
        return not self.realtime

    def __init__(self, pcm: np.ndarray, *, realtime: bool, vad: VadParams,
                 turn_timeout: float = 60.0,
                 progress: Callable[[float], None] | None = None) -> None:
        tail = np.zeros(RATE * (vad.silence_duration_ms + TAIL_MARGIN_MS) // 1000, np.int16)
        pcm = np.concatenate([pcm.astype(np.int16, copy=False), tail])
        pad = (-len(pcm)) % FRAME_SAMPLES
        self.pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
        self.realtime = realtime
        self.vad = vad
        self.turn_timeout = turn_timeout
        self.progress = progress
        self.turns = find_turns(self.pcm, RATE, threshold=vad.threshold,
                                prefix_padding_ms=vad.prefix_padding_ms,
                                silence_duration_ms=vad.silence_duration_ms)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / RATE

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        data = self.pcm.astype("<i2").tobytes()
        total = len(data) // FRAME_BYTES
        async with send:
            try:
                if self.realtime:
                    await self._realtime(send, data, total)
                else:
                    await self._fast(send, data, total, ctx)
            except trio.BrokenResourceError:
                log.debug("uplink closed before the file ended")

    async def _realtime(self, send: trio.MemorySendChannel[bytes], data: bytes,
                        total: int) -> None:
        start = trio.current_time()
        for i in range(total):
            await trio.sleep_until(start + i * FRAME_SAMPLES / RATE)
            await send.send(data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
            self._progress(i + 1, total)

    async def _fast(self, send: trio.MemorySendChannel[bytes], data: bytes, total: int,
                    ctx: Context) -> None:
        def conv() -> p.Conversation:  # a reconnect brings a new conversation object
            return ctx.conversation

        frame = 0
        for turn in self.turns:
            end = min(total, -(-turn.close_sample // FRAME_SAMPLES) + 5)
            for _attempt in range(3):
                # never start talking while the robot is busy or the link is down
                await ctx.watch.wait_for(lambda: (ctx.connected and conv().idle)
                                         or ctx.stopping)
                epoch = ctx.epoch
                done_before, commits_before = conv().responses_done, conv().turns_committed
                for i in range(frame, end):
                    if ctx.epoch != epoch:
                        break  # the link died mid-turn: start the turn again
                    await _send(send, data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
                    self._progress(i + 1, total)
                else:
                    if await self._answered(ctx, epoch, done_before, commits_before, turn):
                        break
                # the link died during this turn: send the whole turn again
                log.info("link changed during the turn ending at %.1f s: sending it again",
                         turn.end_sample / RATE)
            frame = end
        for i in range(frame, total):
            await send.send(data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
            self._progress(i + 1, total)

    async def _answered(self, ctx: Context, epoch: int, done_before: int, commits_before: int,
                        turn: Turn) -> bool:
        """Wait for the turn's reply; False if the connection changed meanwhile."""

        def moved_on() -> bool:
            return ctx.stopping or ctx.epoch != epoch

        with trio.move_on_after(NOTICE_TIMEOUT) as noticed:
            await ctx.watch.wait_for(
                lambda: moved_on() or ctx.conversation.turns_committed > commits_before
                or ctx.conversation.user_speaking)
        if ctx.epoch != epoch:
            return ctx.stopping
        if noticed.cancelled_caught:
            log.info("the service did not hear the turn ending at %.1f s; going on",
                     turn.end_sample / RATE)
            return True
        with trio.move_on_after(self.turn_timeout) as answered:
            await ctx.watch.wait_for(
                lambda: moved_on() or (ctx.conversation.responses_done > done_before
                                       and ctx.conversation.idle))
        if ctx.epoch != epoch and ctx.conversation.responses_done <= done_before:
            return ctx.stopping
        if answered.cancelled_caught:
            log.warning("no reply within %.0f s to the turn ending at %.1f s; going on",
                        self.turn_timeout, turn.end_sample / RATE)
        return True

    def _progress(self, done: int, total: int) -> None:
        if self.progress and (done == total or done % 25 == 0):
            self.progress(done / total)


async def _send(send: trio.MemorySendChannel[bytes], frame: bytes) -> None:
    """Fill the channel without yielding per frame; wait only when it is full (the uplink then
    sends what is queued in one append). The wait for each reply gives the other tasks a turn."""
    try:
        send.send_nowait(frame)
    except trio.WouldBlock:
        await send.send(frame)


class WavSink:
    """Writes the reply audio the speaker would have played: replies back to back, 24 kHz mono.

    ``realtime`` plays at 20 ms per block, so a barge-in cuts the file at what was played;
    otherwise every chunk counts as played the moment it arrives.
    """

    def __init__(self, path: str, *, realtime: bool) -> None:
        self.path = path
        self.realtime = realtime
        self.samples_written = 0

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        with WavWriter(self.path) as writer:
            if self.realtime:
                await self._realtime(receive, buffer, writer)
            else:
                async with receive:
                    async for chunk in receive:
                        buffer.push(chunk.item_id, chunk.pcm)
                        self._write(writer, buffer.read(buffer.queued_samples()))

    async def _realtime(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                        buffer: PlayoutBuffer, writer: WavWriter) -> None:
        finished = trio.Event()

        async def take() -> None:
            async with receive:
                async for chunk in receive:
                    buffer.push(chunk.item_id, chunk.pcm)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            tick = trio.current_time()
            while not (finished.is_set() and buffer.queued_samples() == 0):
                tick += FRAME_SAMPLES / RATE
                await trio.sleep_until(tick)
                self._write(writer, buffer.read(FRAME_SAMPLES))

    def _write(self, writer: WavWriter, pcm: np.ndarray) -> None:
        if len(pcm):
            writer.write(pcm)
            self.samples_written += len(pcm)
