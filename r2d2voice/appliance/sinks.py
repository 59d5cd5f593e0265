"""Where reply audio goes: a WAV file (``replay``) or the speaker (``run``)."""

from __future__ import annotations

import numpy as np
import trio

from r2d2voice.audio.availability import DeviceStates
from r2d2voice.audio.devices import DeviceInfo
from r2d2voice.audio.earcons import is_earcon
from r2d2voice.audio.echo import SpeakerTap
from r2d2voice.audio.files import WavWriter
from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE
from r2d2voice.audio.playback import PlaybackStatistics, run_playback
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer


class WavSink:
    """Writes the reply audio the speaker would have played: replies back to back, 24 kHz mono.

    ``realtime`` plays at 20 ms per block, so a barge-in cuts the file at what was played;
    otherwise every chunk counts as played the moment it arrives. Earcons are not reply
    audio: they are skipped (and counted in ``earcons_skipped``). The file is written beside
    ``path`` and put in its place at the end; when no reply audio came, an existing ``path``
    is left as it was (``kept_existing``).
    """

    def __init__(self, path: str, *, realtime: bool) -> None:
        self.path = path
        self.realtime = realtime
        self.samples_written = 0
        self.earcons_skipped = 0
        self.kept_existing = False

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        writer = WavWriter(self.path, keep_existing=True)
        try:
            if self.realtime:
                await self._realtime(receive, buffer, writer)
            else:
                async with receive:
                    async for chunk in receive:
                        if self._earcon(chunk):
                            continue
                        buffer.push(chunk.item_id, chunk.pcm)
                        self._write(writer, buffer.read(buffer.queued_samples()))
        finally:  # what was played is kept, even after an interruption
            writer.close()
            self.kept_existing = writer.kept_existing

    async def _realtime(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                        buffer: PlayoutBuffer, writer: WavWriter) -> None:
        """A speaker clock: one 20 ms block per tick until the channel closed and all played."""
        finished = trio.Event()

        async def take() -> None:
            async with receive:
                async for chunk in receive:
                    if not self._earcon(chunk):
                        buffer.push(chunk.item_id, chunk.pcm)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            tick = trio.current_time()
            while not (finished.is_set() and buffer.queued_samples() == 0):
                tick += FRAME_SAMPLES / RATE
                await trio.sleep_until(tick)
                self._write(writer, buffer.read(FRAME_SAMPLES))

    def _earcon(self, chunk: AudioChunk) -> bool:
        if is_earcon(chunk.item_id):
            self.earcons_skipped += 1
            return True
        return False

    def _write(self, writer: WavWriter, pcm: np.ndarray) -> None:
        if len(pcm):
            writer.write(pcm)
            self.samples_written += len(pcm)


class DeviceSink:
    """Live playback through the playout buffer (drop-oldest beyond 60 s) on the speaker a
    setting names (or a device already found). The output stream runs only while there is
    something to play; a missing or vanished speaker is waited for, its audio dropped."""

    def __init__(self, device: str | int | DeviceInfo | None, *,
                 latency: float | str | None = 0.03,
                 states: DeviceStates | None = None,
                 tap: SpeakerTap | None = None) -> None:
        self.device = device
        self.latency = latency
        self.states = states
        #: what reaches the speaker, for the echo canceller (None: no canceller)
        self.tap = tap
        self.stats = PlaybackStatistics()

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        await run_playback(receive, buffer, self.device, latency=self.latency, stats=self.stats,
                           states=self.states, tap=self.tap)
