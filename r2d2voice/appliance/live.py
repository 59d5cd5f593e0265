"""Microphone and speaker as pipeline source and sink, for ``r2d2voice run``."""

from __future__ import annotations

import trio

from r2d2voice.appliance.pipeline import Context
from r2d2voice.audio.devices import (
    CaptureStatistics,
    DeviceInfo,
    PlaybackStatistics,
    run_capture,
    run_playback,
)
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer


class DeviceSource:
    """Live capture. Channel policy: never blocks; a full uplink queue drops the newest frame
    and counts it (see ``devices.run_capture``)."""

    live = True

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


class DeviceSink:
    """Live playback through the playout buffer (drop-oldest beyond 60 s)."""

    def __init__(self, device: DeviceInfo, *, latency: float | str | None = 0.03) -> None:
        self.device = device
        self.latency = latency
        self.stats = PlaybackStatistics()

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        await run_playback(receive, buffer, self.device, latency=self.latency, stats=self.stats)
