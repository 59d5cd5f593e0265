"""Microphone and speaker as pipeline source and sink, for ``r2d2voice run``."""

from __future__ import annotations

import trio

from .devices import CaptureStatistics, DeviceInfo, PlaybackStatistics, run_capture, run_playback
from .pipeline import Context
from .playout import AudioChunk, PlayoutBuffer


class DeviceSource:
    """Live capture. Channel policy: never blocks; a full uplink queue drops the newest frame
    and counts it (see ``devices.run_capture``)."""

    live = True

    def __init__(self, device: DeviceInfo, *, latency: float | str | None = None) -> None:
        self.device = device
        self.latency = latency
        self.stats = CaptureStatistics()
        self.running = trio.Event()

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_capture(
                send, self.device, latency=self.latency, stats=self.stats,
                task_status=task_status))
            self.running.set()

    def healthy(self, within: float = 5.0) -> bool:
        """Frames arrived in the last ``within`` seconds (or capture is still starting)."""
        last = self.stats.last_frame_time
        if last is None:
            return not self.running.is_set()
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
