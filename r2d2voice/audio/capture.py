"""The microphone: PortAudio input blocks → 20 ms frames of 24 kHz mono PCM16 on a trio channel.

Threads: PortAudio calls :meth:`_Capture.callback` on its own real-time thread. It never blocks,
never raises, never logs and allocates nothing: it copies the block into a preallocated ring
(1 s) and, once a *batch* is there, asks the trio thread to :meth:`~_Capture.drain` it (one
``run_sync_soon`` per batch, none while a wake-up is pending). The trio side downmixes,
resamples and frames the whole batch at once.

Batching: while nothing happens (no turn open, nothing playing) a batch is 100 ms, so trio
wakes 10 times a second instead of 50 and the uplink sends five frames per append. Whoever
knows that something happens sets :meth:`~_Capture.set_urgent` (``DeviceSource`` does, from the
conversation): then every block is handed over as it comes, and the barge-in gate and the end
of a turn see the audio without the batch's delay. The first speech of a turn waits at most one
batch (100 ms) longer for the service's VAD.

Echo: with an :class:`~r2d2voice.audio.echo.EchoCanceller`, the callback also stamps each block
with its ADC time (``inputBufferAdcTime`` on the monotonic clock) and the trio side runs the
24 kHz audio through the canceller before framing it; a new stream resets the canceller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time as _time
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from r2d2voice.audio.availability import DeviceStates, keep_device
from r2d2voice.audio.devices import DeviceInfo
from r2d2voice.audio.echo import EchoCanceller, PaClock, StreamClock
from r2d2voice.audio.pcm import RATE, Framer, Resampler, float_to_pcm16, to_mono
from r2d2voice.audio.portaudio import (
    DeviceUnavailable,
    StreamPlan,
    StreamWatch,
    candidate_rates,
    host,
)

log = logging.getLogger(__name__)

__all__ = ["CaptureStatistics", "run_capture"]

#: Seconds between two warnings about drops or overruns.
LOG_INTERVAL = 1.0
#: Audio handed to trio at once while nothing happens (see the module docstring).
BATCH_MS = 100
#: A stream that delivers no block for this long is closed and opened again.
STALL_SECONDS = 3.0
#: The ring between the callback and trio holds this much audio.
RING_SECONDS = 1.0


class Reopen(Exception):
    """The stream was closed for a device rescan: find the device again and reopen it."""


@dataclass
class CaptureStatistics:
    """Capture counters, updated on the trio thread (``overflows`` also from the callback).

    ``frames_dropped``: 20 ms frames discarded because the uplink channel was full.
    ``overflows``: blocks lost before we saw them (PortAudio's input overflow, or the ring
    full because trio did not drain it for a second). ``last_frame_time``: trio time of the last
    frame delivered, or None before the first. ``last_progress``: trio time the capture loop
    last did something it should (a frame, a look for a missing device, a reopen).
    ``reopens``: streams opened again after the device failed or went silent.
    """

    frames_sent: int = 0
    frames_dropped: int = 0
    overflows: int = 0
    last_frame_time: float | None = None
    last_progress: float | None = None
    reopens: int = 0
    samplerate: int | None = None
    channels: int | None = None


class _RateLimit:
    """True at most once per ``interval`` seconds of trio time."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._next = -math.inf

    def ready(self) -> bool:
        now = trio.current_time()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


class _Capture:
    """The ring between PortAudio's thread and trio, and the framing on the trio side."""

    def __init__(self, send: trio.MemorySendChannel[bytes], stats: CaptureStatistics,
                 token: trio.lowlevel.TrioToken, *, batch_ms: int = BATCH_MS,
                 echo: EchoCanceller | None = None) -> None:
        self.send = send
        self.echo = echo
        self.timeline = StreamClock()
        self.pa_clock = PaClock()
        self.latency = 0.0
        self.stats = stats
        self.token = token
        self.batch_ms = batch_ms
        self.receiver_gone = trio.Event()
        self.urgent = False
        self.on_block: Any = None  # trio-side hook after each drain (the stall timer)
        self._limiter = _RateLimit()
        self._reported = (0, 0)
        self.configure(RATE, 1)

    def configure(self, rate: int, channels: int) -> None:
        """A new stream (trio thread, no callback running): fresh ring, resampler, framer."""
        self.rate = rate
        self.ring = np.zeros((round(rate * RING_SECONDS), channels), dtype=np.float32)
        self.written = 0  # samples written by the callback (total)
        self.read = 0  # samples consumed by trio (total)
        self.batch = max(1, rate * self.batch_ms // 1000)
        self.wake_pending = False
        self.resampler = Resampler(rate, RATE, channels=1)
        self.framer = Framer()
        self.timeline.start(rate)
        self.pa_clock = PaClock()
        self.produced = 0  # 24 kHz samples out of the resampler since the stream opened
        if self.echo is not None:
            self.echo.reset()

    def set_urgent(self, urgent: bool) -> None:
        """Hand every block over at once (True) or in batches (False); trio thread."""
        if urgent and not self.urgent:
            self.urgent = True
            self.drain()  # what waited for the batch goes now
        self.urgent = urgent

    # -- PortAudio thread ---------------------------------------------------------------------

    def callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        with contextlib.suppress(Exception):  # RunFinishedError once trio has ended
            if self.echo is not None:
                adc = self.pa_clock.to_monotonic(time, _time.monotonic(), "inputBufferAdcTime",
                                                 -self.latency - frames / self.rate)
                self.timeline.update(self.written, adc)
            self.push(indata, bool(status.input_overflow))

    def push(self, block: np.ndarray, overflowed: bool) -> None:
        """Copy ``block`` into the ring; wake trio once a batch is there (or at once when
        urgent). Runs on the PortAudio thread: no allocation, no lock, no wait."""
        if overflowed:
            self.stats.overflows += 1
        n, cap, w = len(block), len(self.ring), self.written
        if w - self.read + n > cap:
            self.stats.overflows += 1  # trio fell a second behind: this block is lost
        else:
            start = w % cap
            first = min(n, cap - start)
            self.ring[start:start + first] = block[:first]
            if first < n:
                self.ring[:n - first] = block[first:]
            self.written = w + n  # after the copy: trio reads up to here
        if not self.wake_pending and (self.urgent or self.written - self.read >= self.batch):
            self.wake_pending = True
            self.token.run_sync_soon(self.drain)

    # -- trio thread --------------------------------------------------------------------------

    def drain(self) -> None:
        """Downmix, resample to 24 kHz, frame and send what the ring holds, without waiting."""
        self.wake_pending = False  # before reading ``written``: a later block wakes us again
        w, r = self.written, self.read
        if w == r or self.receiver_gone.is_set():
            self.read = w
            return
        cap = len(self.ring)
        start, end = r % cap, w % cap
        block = (self.ring[start:start + w - r] if start < end or end == 0
                 else np.concatenate((self.ring[start:], self.ring[:end])))
        pcm = float_to_pcm16(self.resampler.process(to_mono(block)))
        self.read = w  # the ring's samples are copied out (pcm is a new array)
        if self.echo is not None and len(pcm):
            at = self.timeline.time_of(self.produced * self.rate / RATE)
            self.produced += len(pcm)
            if at is not None:
                pcm = self.echo.process(pcm, at)
        self._send(self.framer.push(pcm))
        if self.on_block is not None:
            self.on_block()

    def _send(self, frames: list[bytes]) -> None:
        stats = self.stats
        for frame in frames:
            try:
                self.send.send_nowait(frame)
            except trio.WouldBlock:
                stats.frames_dropped += 1  # policy: a full uplink drops the newest frame
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.receiver_gone.set()  # nobody listens any more: capture ends
                return
            stats.frames_sent += 1
        if frames:
            stats.last_frame_time = stats.last_progress = trio.current_time()
        counts = (stats.frames_dropped, stats.overflows)
        if counts != self._reported and self._limiter.ready():
            log.warning(
                "capture: %d frames dropped (uplink full), %d input overflows so far", *counts
            )
            self._reported = counts


async def run_capture(
    send: trio.MemorySendChannel[bytes],
    device: str | int | DeviceInfo | None,
    *,
    block_ms: int = 20,
    batch_ms: int = BATCH_MS,
    latency: float | str | None = None,
    samplerate: int | None = None,
    stats: CaptureStatistics | None = None,
    states: DeviceStates | None = None,
    capture: list[_Capture] | None = None,
    echo: EchoCanceller | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Record the microphone ``device`` names (a setting, or a device already found) and send
    20 ms frames of 24 kHz mono PCM16 (960 bytes) to ``send``.

    Opens the device at its default rate (``samplerate`` overrides; 48000 and 44100 are tried if
    it refuses) with up to two channels, downmixed. Runs until cancelled or until the receiving
    end is closed; ``send`` is closed on the way out, so the end of the stream flows downstream.

    A device that is missing, stops on its own (unplugged, sound server gone) or delivers
    nothing for ``STALL_SECONDS`` is waited for and reopened (see
    :func:`~r2d2voice.audio.availability.keep_device`); the audio of the gap is lost.
    ``task_status.started()`` comes once capture runs or once it waits for the device.
    ``capture`` (a list) receives the :class:`_Capture`, for its owner to set its urgency.
    ``echo``: the canceller the audio goes through before it is framed (reset per stream).

    Policy when the uplink channel is full: capture never blocks; the newest frame is dropped and
    counted in ``stats.frames_dropped`` (with a warning at most once a second).
    """
    stats = stats if stats is not None else CaptureStatistics()
    spec = device.name if isinstance(device, DeviceInfo) else device
    first = device if isinstance(device, DeviceInfo) else None
    async with send:
        cap = _Capture(send, stats, trio.lowlevel.current_trio_token(), batch_ms=batch_ms,
                       echo=echo)
        if capture is not None:
            capture.append(cap)
        started = False
        opened = 0

        def progress() -> None:
            stats.last_progress = trio.current_time()

        def announce() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async def session(dev: DeviceInfo, running: Any) -> None:
            nonlocal opened
            if opened:
                stats.reopens += 1
            opened += 1
            await _session(cap, dev, block_ms=block_ms, latency=latency, samplerate=samplerate,
                           running=lambda: (running(), progress(), announce()))

        while True:
            try:
                await keep_device("input", spec, session, states=states, first=first,
                                  on_progress=progress, on_waiting=announce)
                return
            except Reopen:
                first = None  # after a rescan, indexes change: look the device up again
                await host().wait_no_rescan()


async def _session(cap: _Capture, device: DeviceInfo, *, block_ms: int,
                   latency: float | str | None, samplerate: int | None, running: Any) -> None:
    """One input stream on ``device``: until the receiver is gone (returns), the device fails
    or stalls (DeviceUnavailable), or a rescan needs the stream closed (Reopen)."""
    pa = host()
    generation = pa.generation  # ``device`` was found in this generation's list
    channels = max(1, min(2, device.max_input_channels))
    watch = StreamWatch(cap.token)
    plan = StreamPlan(device.index, device.describe(), "input",
                      candidate_rates(device.default_samplerate, samplerate), block_ms,
                      {"channels": channels, "dtype": "float32", "latency": latency,
                       "callback": cap.callback, "finished_callback": watch.finished_callback})
    stream, rate = await pa.open(plan)
    try:
        if pa.generation != generation:  # a rescan came first: the index may be another's
            raise Reopen
        cap.latency = float(stream.latency)
        cap.configure(rate, channels)
        cap.stats.samplerate, cap.stats.channels = rate, channels
        await watch.start(stream, f"input device {device.describe()}")
        log.info("capturing from %s at %d Hz, %d channel(s), latency %.0f ms",
                 device.describe(), rate, channels, stream.latency * 1000)
        with trio.CancelScope() as stall:
            heard = False

            def fed() -> None:
                nonlocal heard
                stall.deadline = trio.current_time() + STALL_SECONDS
                if not heard:  # audio arrives: the device works
                    heard = True
                    running()

            stall.deadline = trio.current_time() + STALL_SECONDS
            cap.on_block = fed
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, cap.receiver_gone, nursery.cancel_scope)
                nursery.start_soon(_cancel_on, watch.stopped, nursery.cancel_scope)
                while not (pa.rescan_wanted and pa.pause_capture):
                    await pa.changed()
                nursery.cancel_scope.cancel()
        cap.on_block = None
        if cap.receiver_gone.is_set():
            return
        if watch.stopped.is_set():
            raise DeviceUnavailable(f"input device {device.describe()} stopped delivering audio")
        if stall.cancelled_caught:
            raise DeviceUnavailable(f"no audio from input device {device.describe()} for "
                                    f"{STALL_SECONDS:g} s")
        raise Reopen
    finally:
        cap.on_block = None
        await watch.close(stream)
        pa.closed()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
