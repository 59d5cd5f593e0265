"""The speaker: reply audio from a trio channel, through the :class:`PlayoutBuffer`, to PortAudio.

The output stream runs only while there is something to play: it is opened and started on the
first chunk of a reply, and closed after ``IDLE_STOP_SECONDS`` of silence (a running stream wakes
a real-time thread every few milliseconds to play zeros; a closed one costs nothing). The
playback callback pulls from the thread-safe buffer and resamples into a FIFO; once the buffer
has been empty long enough to flush the resampler it just writes zeros.

A speaker that is missing or goes away is waited for (:mod:`r2d2voice.audio.availability`);
meanwhile reply audio is dropped as it comes (nothing would hear it, and the echo gate must not
hold the microphone for it).

Echo: with a :class:`~r2d2voice.audio.echo.SpeakerTap`, every block the callback hands to the
device (after the playout buffer, the volume gain and the earcons) goes through the tap: it is
ducked when someone talks over the robot, then copied, with its DAC time, as the echo
canceller's reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from r2d2voice.audio.availability import DeviceStates, keep_device
from r2d2voice.audio.capture import LOG_INTERVAL, Reopen
from r2d2voice.audio.devices import DeviceInfo
from r2d2voice.audio.echo import SpeakerTap
from r2d2voice.audio.pcm import RATE, Resampler
from r2d2voice.audio.portaudio import (
    DeviceUnavailable,
    StreamPlan,
    StreamWatch,
    candidate_rates,
    host,
)

if TYPE_CHECKING:
    from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

log = logging.getLogger(__name__)

__all__ = ["PlaybackStatistics", "run_playback"]

#: The output stream closes after this long with nothing to play.
IDLE_STOP_SECONDS = 1.0
#: How often a running stream checks whether it has become idle.
IDLE_CHECK_SECONDS = 0.1
#: Zeros fed to the resampler after the buffer ran dry before the callback writes plain zeros
#: (the resampler holds ~40 ms of the reply's end; the FIFO up to ~65 ms more).
FLUSH_SAMPLES = RATE // 5


@dataclass
class PlaybackStatistics:
    """Playback counters (written by the PortAudio callback, read anywhere).

    ``underruns``: a reply ran out of audio mid-way and silence was played until more came
    (also counted in the PlayoutBuffer's statistics). ``output_underflows``: PortAudio reported
    the device itself was starved (the callback was late). ``callback_errors``: exceptions caught
    in the callback (silence was played instead). ``starts``: times the stream was started
    (it stops when idle). ``dropped_samples``: reply audio dropped while the speaker was missing.
    """

    callbacks: int = 0
    underruns: int = 0
    output_underflows: int = 0
    callback_errors: int = 0
    starts: int = 0
    dropped_samples: int = 0
    samplerate: int | None = None
    channels: int | None = None


class _Output:
    """State of the output callback, which runs on PortAudio's thread.

    Each call pulls 10 ms blocks of 24 kHz audio from the PlayoutBuffer (zeros when it is empty)
    through a streaming resampler into a device-rate FIFO until the FIFO holds ``frames``
    samples; a streaming resampler does not return exactly ``frames`` per call (libsoxr emits in
    bursts of ~35 ms), so the FIFO carries the difference. Sample arrays are preallocated; only
    the resampler allocates its output. Once ``FLUSH_SAMPLES`` of zeros went through after the
    buffer ran dry, the callback writes zeros without pulling or resampling.
    """

    PULL_SAMPLES = RATE // 100  # 10 ms at 24 kHz

    def __init__(self, buffer: PlayoutBuffer, stats: PlaybackStatistics,
                 tap: SpeakerTap | None = None) -> None:
        self.buffer = buffer
        self.stats = stats
        self.tap = tap
        self.resampler: Resampler | None = None  # set by configure() once the stream is open
        self.pull = np.zeros(self.PULL_SAMPLES, dtype=np.int16)
        self.fifo = np.zeros(0, dtype=np.int16)
        self.fifo_len = 0
        self.playing = False
        self.zero_run = FLUSH_SAMPLES  # zeros fed since the buffer last gave audio
        #: Times a reply ran dry (incremented here only; the trio side decides if it was mid-way).
        self.dry_events = 0

    def configure(self, rate: int) -> None:
        self.resampler = Resampler(RATE, rate, channels=1)
        self.fifo = np.zeros(rate, dtype=np.int16)  # 1 s at the device rate: far more than needed
        self.reset()

    def reset(self) -> None:
        """Forget what the resampler and FIFO hold (the stream is stopped: no callback runs)."""
        if self.resampler is not None:
            self.resampler.reset()
        self.fifo_len = 0
        self.playing = False
        self.zero_run = FLUSH_SAMPLES

    @property
    def silent(self) -> bool:
        """Nothing of a reply is left in the resampler or FIFO."""
        return self.zero_run >= FLUSH_SAMPLES

    def callback(self, outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        try:
            self.stats.callbacks += 1
            if status.output_underflow:
                self.stats.output_underflows += 1
            if self.zero_run >= FLUSH_SAMPLES and self.buffer.queued_samples() == 0:
                outdata.fill(0)  # the fast path: nothing queued, nothing left in the pipe
                self.fifo_len = 0
            else:
                self._fill(frames)
                n = min(frames, self.fifo_len)
                outdata[:n] = self.fifo[:n, np.newaxis]  # mono -> every channel
                outdata[n:] = 0
                rest = self.fifo_len - n
                self.fifo[:rest] = self.fifo[n : self.fifo_len]
                self.fifo_len = rest
            if self.tap is not None:
                self.tap.render(outdata, time)  # what leaves for the device: the reference
        except Exception:
            self.stats.callback_errors += 1
            outdata.fill(0)

    def _fill(self, frames: int) -> None:
        pull, resampler = self.pull, self.resampler
        if resampler is None:
            return
        for _ in range(256):  # bounded: the resampler's first output comes within ~4 pulls
            if self.fifo_len >= frames:
                return
            got = self.buffer.read_into(pull)
            if got < len(pull):
                if self.playing:
                    self.dry_events += 1
                self.playing = False
                self.zero_run = 0 if got else self.zero_run + len(pull)
            else:
                self.playing = True
                self.zero_run = 0
            y = resampler.process(pull)
            m = min(len(y), len(self.fifo) - self.fifo_len)
            self.fifo[self.fifo_len : self.fifo_len + m] = y[:m]
            self.fifo_len += m


class _Speaker:
    """Opens the output device for each burst of audio and closes it once idle.

    Idle, no stream is open: nothing runs, a device rescan needs nothing of the speaker, and a
    sound server that restarts meanwhile leaves no dead stream behind (starting a stopped
    stream whose server died hangs PortAudio). Opening costs a few milliseconds at the first
    chunk of a reply.
    """

    def __init__(self, buffer: PlayoutBuffer, stats: PlaybackStatistics, *,
                 latency: float | str | None, samplerate: int | None,
                 idle_stop: float, tap: SpeakerTap | None = None) -> None:
        self.buffer = buffer
        self.stats = stats
        self.tap = tap
        self.output = _Output(buffer, stats, tap)
        self.latency = latency
        self.samplerate = samplerate
        self.idle_stop = idle_stop
        self.missing = False
        self.stream_latency = 0.0
        self._audio = trio.Event()

    def poke(self) -> None:
        """Audio was pushed (trio thread): play it, or drop it while there is no speaker."""
        if self.missing:
            self.stats.dropped_samples += self.buffer.clear()
        self._audio.set()

    def lost(self) -> None:
        """The speaker is missing: drop what waits for it, and what comes until it is back."""
        self.missing = True
        self.stats.dropped_samples += self.buffer.clear()

    async def _until_idle(self) -> None:
        """While the stream runs: until nothing was queued or left in the pipe for a while."""
        idle_since: float | None = None
        while True:
            await trio.sleep(IDLE_CHECK_SECONDS)
            now = trio.current_time()
            if self.buffer.queued_samples() > 0 or not self.output.silent:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.idle_stop:
                return

    async def session(self, device: DeviceInfo, running: Callable[[], None]) -> None:
        """Play bursts on ``device`` until it fails (DeviceUnavailable) or a rescan changed
        the device indexes (Reopen)."""
        pa = host()
        generation = pa.generation
        channels = max(1, min(2, device.max_output_channels))
        label = f"output device {device.describe()}"
        token = trio.lowlevel.current_trio_token()
        rates = candidate_rates(device.default_samplerate, self.samplerate)
        first = True
        if self.tap is not None:
            self.tap.device_opened()  # (re)opened: the canceller starts afresh
        while True:
            if not first:
                while self.buffer.queued_samples() == 0:
                    self._audio = trio.Event()
                    await self._audio.wait()
            if pa.generation != generation:
                raise Reopen
            watch = StreamWatch(token)
            plan = StreamPlan(device.index, device.describe(), "output", rates, None,
                              {"channels": channels, "dtype": "int16", "latency": self.latency,
                               "callback": self.output.callback,
                               "finished_callback": watch.finished_callback})
            stream, rate = await pa.open(plan)
            try:
                if pa.generation != generation:  # a rescan came first: look again
                    raise Reopen
                if first:  # the device opens: it is there; it plays when audio comes
                    log.info("playing to %s at %d Hz, %d channel(s), latency %.0f ms",
                             device.describe(), rate, channels, stream.latency * 1000)
                    self.stats.samplerate, self.stats.channels = rate, channels
                    self.stream_latency = float(stream.latency)
                    self.missing = first = False
                    running()
                    continue
                self.output.configure(rate)
                if self.tap is not None:
                    self.tap.start(rate, float(stream.latency))
                await watch.start(stream, label)
                self.stats.starts += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on, watch.stopped, nursery.cancel_scope)
                    await self._until_idle()
                    nursery.cancel_scope.cancel()
                if watch.stopped.is_set():
                    raise DeviceUnavailable(f"{label} stopped playing")
            finally:
                await watch.close(stream)
                if self.tap is not None:
                    self.tap.stop()
                pa.closed()

    async def run(self, spec: str | int | None, first: DeviceInfo | None,
                  states: DeviceStates | None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        def announce() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async def session(device: DeviceInfo, running: Callable[[], None]) -> None:
            await self.session(device, lambda: (running(), announce()))

        def waiting() -> None:
            self.lost()
            announce()

        while True:
            try:
                await keep_device("output", spec, session, states=states, first=first,
                                  on_waiting=waiting,
                                  capture_running=lambda: host().open_streams > 0)
                return
            except Reopen:
                first = None
                await host().wait_no_rescan()


async def run_playback(
    receive: trio.MemoryReceiveChannel[AudioChunk],
    buffer: PlayoutBuffer,
    device: str | int | DeviceInfo | None,
    *,
    latency: float | str | None = 0.03,
    drain_timeout: float = 65.0,
    samplerate: int | None = None,
    idle_stop: float = IDLE_STOP_SECONDS,
    stats: PlaybackStatistics | None = None,
    states: DeviceStates | None = None,
    tap: SpeakerTap | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Play the chunks from ``receive`` on the speaker ``device`` names, through ``buffer``.

    Opens the device at its default rate (``samplerate`` overrides; 48000 and 44100 are tried if
    it refuses) with up to two channels (mono duplicated); ``latency`` is PortAudio's suggested
    output latency (small boards need ~30 ms). The stream runs from the first chunk until
    ``idle_stop`` seconds after the last sample played. Chunks go into ``buffer`` as they come
    (its policy when full: drop the oldest, count it; this task never waits on the speaker).
    When ``receive`` closes, waits up to ``drain_timeout`` for the buffer to play out, then
    closes the stream. The samples handed to the device per reply item are counted by
    ``buffer`` (``played_samples``). A missing or vanished speaker is waited for; meanwhile
    reply audio is dropped (``stats.dropped_samples``). ``task_status.started()`` comes once the
    device opened (it is then closed until audio comes) or once it is waited for.
    ``tap``: every block handed to the device goes through it (the echo canceller's
    reference, the double-talk duck).
    """
    stats = stats if stats is not None else PlaybackStatistics()
    spec = device.name if isinstance(device, DeviceInfo) else device
    first = device if isinstance(device, DeviceInfo) else None
    async with receive:
        speaker = _Speaker(buffer, stats, latency=latency, samplerate=samplerate,
                           idle_stop=idle_stop, tap=tap)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_playback, stats)
            await nursery.start(speaker.run, spec, first, states)
            task_status.started()
            await _feed(receive, buffer, speaker, stats)
            # End of stream: let the buffer, the FIFO and the device play out.
            with trio.move_on_after(drain_timeout):
                while buffer.queued_samples() > 0:
                    await trio.sleep(0.01)
                await trio.sleep(speaker.stream_latency + 0.1)
            nursery.cancel_scope.cancel()


async def _feed(receive: trio.MemoryReceiveChannel[AudioChunk], buffer: PlayoutBuffer,
                speaker: _Speaker, stats: PlaybackStatistics) -> None:
    """Move chunks into the buffer; notice replies that ran dry mid-way (underruns)."""
    output = speaker.output
    seen_dry = output.dry_events
    last_item: str | None = None
    async for chunk in receive:
        dry = output.dry_events
        buffer.push(chunk.item_id, chunk.pcm)
        speaker.poke()
        # The buffer ran empty since the last push, and more audio of the same reply came
        # (and was queued, i.e. the item was not cancelled): the listener heard a gap. A gap
        # before a new item is the normal pause between replies.
        if dry != seen_dry and chunk.item_id == last_item and buffer.queued_samples() > 0:
            buffer.note_underrun()
            stats.underruns += 1
        seen_dry = dry
        last_item = chunk.item_id


async def _report_playback(stats: PlaybackStatistics) -> None:
    """Warn about underruns, device underflows and callback errors, at most once a second."""
    reported = (0, 0, 0)
    while True:
        await trio.sleep(LOG_INTERVAL)
        counts = (stats.underruns, stats.output_underflows, stats.callback_errors)
        if counts != reported:
            log.warning(
                "playback: %d underruns, %d device underflows, %d callback errors so far",
                *counts,
            )
            reported = counts


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
