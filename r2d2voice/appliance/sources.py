"""Where microphone audio comes from: a recording (``replay``) or the microphone (``run``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from r2d2voice.appliance.context import Context
from r2d2voice.audio.devices import CaptureStatistics, DeviceInfo, run_capture
from r2d2voice.audio.pcm import FRAME_BYTES, FRAME_SAMPLES, RATE
from r2d2voice.audio.vad import Turn, find_turns

log = logging.getLogger("r2d2voice.appliance.sources")

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
    frames_dropped = 0

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
    def resends(self) -> bool:
        """Fast mode sends a turn again when its link died: queued frames are stale then."""
        return not self.realtime

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
        frame = 0
        for turn in self.turns:
            end = min(total, -(-turn.close_sample // FRAME_SAMPLES) + 5)
            for _attempt in range(3):
                # never start talking while the robot is busy or the link is down
                await ctx.watch.wait_for(
                    lambda: (ctx.connected and ctx.conversation.idle) or ctx.stopping)
                epoch = ctx.epoch
                conv = ctx.conversation  # a reconnect brings a new conversation object
                done_before, commits_before = conv.responses_done, conv.turns_committed
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


class DeviceSource:
    """Live capture. Channel policy: never blocks; a full uplink queue drops the newest frame
    and counts it (see ``devices.run_capture``)."""

    live = True
    resends = False

    def __init__(self, device: DeviceInfo, *, latency: float | str | None = None) -> None:
        self.device = device
        self.latency = latency
        self.stats = CaptureStatistics()
        self.running = trio.Event()
        self._started_at = 0.0

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_capture(
                send, self.device, latency=self.latency, stats=self.stats,
                task_status=task_status))
            self._started_at = trio.current_time()
            self.running.set()

    @property
    def frames_dropped(self) -> int:
        """Frames dropped because the uplink queue was full (e.g. while reconnecting)."""
        return self.stats.frames_dropped

    def healthy(self, within: float = 5.0) -> bool:
        """Frames arrived in the last ``within`` seconds (or capture is still starting).

        A stream that started less than ``within`` seconds ago and has not delivered its first
        frame yet counts as healthy: a check falling between start and first frame must not
        withhold a ping (one missed ping is a gap of a whole ``WatchdogSec``).
        """
        if not self.running.is_set():
            return True
        last = self.stats.last_frame_time
        if last is None:
            last = self._started_at
        return trio.current_time() - last < within
