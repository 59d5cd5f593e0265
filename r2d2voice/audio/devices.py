"""Sound devices through sounddevice (PortAudio), bridged to trio.

sounddevice is imported lazily, inside functions: importing it loads PortAudio and scans every
ALSA device, which ``r2d2voice --help`` (or a WAV replay) must not pay for or fail on.

Threads: PortAudio calls the stream callbacks on its own real-time thread. Those callbacks never
block, never raise and never log. The capture callback copies the block and hands it to the trio
thread (``run_sync_soon``), where it is downmixed, resampled and framed. The playback callback
pulls from the thread-safe :class:`~r2d2voice.audio.playout.PlayoutBuffer` and resamples in place.
Opening and closing streams can take tens of milliseconds, so it happens in a worker thread,
one call at a time (PortAudio's API is not thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import trio

from r2d2voice.audio.pcm import RATE, Framer, Resampler, float_to_pcm16, to_mono
from r2d2voice.errors import ConfigError, RuntimeFailure

if TYPE_CHECKING:
    from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

log = logging.getLogger(__name__)

__all__ = [
    "CaptureStatistics",
    "DeviceInfo",
    "PlaybackStatistics",
    "devices_command",
    "format_devices",
    "list_devices",
    "resolve_device",
    "run_capture",
    "run_playback",
]

Kind = Literal["input", "output"]

#: Rates tried, after the device's default, when a device refuses to open at its default rate.
FALLBACK_RATES = (48000, 44100)
#: Seconds between two warnings about overruns, drops or underruns.
LOG_INTERVAL = 1.0

# PortAudio's API is not thread-safe: stream open/start/close calls made from worker threads
# go through this lock, one at a time.
_pa_lock = threading.Lock()


def _sd() -> ModuleType:
    """Import sounddevice; a missing PortAudio library is a configuration error (exit 3)."""
    try:
        import sounddevice
    except OSError as exc:
        raise ConfigError(
            "PortAudio library not found: install it with `apt install libportaudio2`"
        ) from exc
    except Exception as exc:  # sounddevice.PortAudioError from Pa_Initialize
        raise ConfigError(f"PortAudio failed to initialise: {exc}") from exc
    return sounddevice


# -- listing and choosing devices ---------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device, as listed at start-up."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool

    def channels(self, kind: Kind) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels

    def describe(self) -> str:
        return f"{self.index} {self.name!r}"


def _default_index(sd: ModuleType, kind: Kind) -> int | None:
    try:
        return int(sd.query_devices(kind=kind)["index"])
    except Exception:  # PortAudioError: no default device of that kind
        return None


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio sees, with its default-input/output flags."""
    sd = _sd()
    hostapis = [h["name"] for h in sd.query_hostapis()]
    default_in = _default_index(sd, "input")
    default_out = _default_index(sd, "output")
    devices = []
    for d in sd.query_devices():
        hostapi = d["hostapi"]
        devices.append(
            DeviceInfo(
                index=int(d["index"]),
                name=str(d["name"]),
                hostapi=hostapis[hostapi] if 0 <= hostapi < len(hostapis) else str(hostapi),
                max_input_channels=int(d["max_input_channels"]),
                max_output_channels=int(d["max_output_channels"]),
                default_samplerate=float(d["default_samplerate"]),
                is_default_input=d["index"] == default_in,
                is_default_output=d["index"] == default_out,
            )
        )
    return devices


def format_devices(devs: list[DeviceInfo]) -> str:
    """A table of input and output devices; ``*`` marks the defaults."""
    lines = []
    sections: tuple[tuple[Kind, str], ...] = (("input", "Input"), ("output", "Output"))
    for kind, title in sections:
        lines.append(f"{title} devices:")
        rows = [d for d in devs if d.channels(kind) > 0]
        if not rows:
            lines.append("  (none)")
        width = max((len(d.name) for d in rows), default=0)
        for d in rows:
            default = d.is_default_input if kind == "input" else d.is_default_output
            lines.append(
                f"  {'*' if default else ' '} {d.index:>3}  {d.name:<{width}}  "
                f"{d.channels(kind):>3} ch  {d.default_samplerate:>6.0f} Hz  {d.hostapi}"
            )
    lines.append("(* = default; choose with an index or a part of the name)")
    return "\n".join(lines)


def devices_command() -> None:
    """The ``devices`` command: the table of inputs and outputs on stdout."""
    print(format_devices(list_devices()))


def _inventory(devs: list[DeviceInfo], kind: Kind) -> str:
    rows = [d.describe() for d in devs if d.channels(kind) > 0]
    return f"{kind}s: {', '.join(rows) if rows else 'none'}"


def resolve_device(
    spec: str | int | None, kind: Kind, devices: list[DeviceInfo] | None = None
) -> DeviceInfo:
    """Find the device ``spec`` names, for ``kind`` ("input" or "output").

    ``None`` (or "") is the system default; an int or a string of digits is an index; any other
    string is a case-insensitive part of the name (names survive reboots, USB card numbers do
    not). An exact name wins over substrings; several substring matches are ambiguous. Anything
    unusable raises :class:`ConfigError` with one line listing the devices there are.
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
    devs = list_devices() if devices is None else devices
    usable = [d for d in devs if d.channels(kind) > 0]
    inventory = _inventory(devs, kind)

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        for d in usable:
            if d.is_default_input if kind == "input" else d.is_default_output:
                return d
        raise ConfigError(f"no default {kind} device; {inventory}")

    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        found = next((d for d in devs if d.index == index), None)
        if found is None:
            raise ConfigError(f"no {kind} device with index {index}; {inventory}")
        if found.channels(kind) <= 0:
            raise ConfigError(f"device {found.describe()} has no {kind} channels; {inventory}")
        return found

    needle = spec.strip().casefold()
    exact = [d for d in usable if d.name.casefold() == needle]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [d for d in usable if needle in d.name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(d.describe() for d in matches)
        raise ConfigError(f"{kind} device {spec!r} is ambiguous: matches {names}; use an index")
    raise ConfigError(f"no {kind} device matches {spec!r}; {inventory}")


# -- shared stream plumbing ---------------------------------------------------------------------


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


def _candidate_rates(device: DeviceInfo, samplerate: int | None) -> list[int]:
    if samplerate is not None:
        return [int(samplerate)]
    rates = [int(device.default_samplerate)] if device.default_samplerate > 0 else []
    rates += [r for r in FALLBACK_RATES if r not in rates]
    return rates


def _open_stream(
    factory: Any,
    device: DeviceInfo,
    kind: Kind,
    rates: list[int],
    block_ms: int | None,
    **kwargs: Any,
) -> tuple[Any, int]:
    """Open (not start) a stream at the first rate the device accepts: (stream, rate).

    Runs in a worker thread. ``block_ms=None`` lets PortAudio pick the block size.
    """
    sd = _sd()
    errors = []
    with _pa_lock:
        for rate in rates:
            blocksize = 0 if block_ms is None else max(1, rate * block_ms // 1000)
            try:
                stream = factory(
                    device=device.index, samplerate=rate, blocksize=blocksize, **kwargs
                )
            except sd.PortAudioError as exc:
                errors.append(f"{rate} Hz: {exc}")
            else:
                return stream, rate
    try:
        inventory = _inventory(list_devices(), kind)
    except ConfigError:
        inventory = f"{kind}s: unknown"
    raise ConfigError(
        f"cannot open {kind} device {device.describe()} ({'; '.join(errors)}); {inventory}"
    )


def _start(stream: Any, device: DeviceInfo, kind: Kind) -> None:
    sd = _sd()
    with _pa_lock:
        try:
            stream.start()
        except sd.PortAudioError as exc:  # busy or vanished: may go away, so exit 1 (restart)
            raise RuntimeFailure(f"cannot start {kind} device {device.describe()}: {exc}") from exc


def _close(stream: Any) -> None:
    with _pa_lock:
        stream.close(ignore_errors=True)


class _StreamWatch:
    """Tells the trio side that PortAudio ended a stream we did not close (device gone)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self.closing = False
        self.stopped = trio.Event()

    def finished_callback(self) -> None:  # PortAudio thread
        if self.closing:
            return
        with contextlib.suppress(Exception):  # RunFinishedError: trio is gone already
            self._token.run_sync_soon(self.stopped.set)

    async def close(self, stream: Any) -> None:
        """Close the stream in a worker thread, even while being cancelled."""
        self.closing = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, stream)


# -- capture ------------------------------------------------------------------------------------


@dataclass
class CaptureStatistics:
    """Capture counters, updated on the trio thread.

    ``frames_dropped``: 20 ms frames discarded because the uplink channel was full.
    ``overflows``: blocks PortAudio flagged as input overflow (samples lost before we saw them).
    ``last_frame_time``: ``trio.current_time()`` when the last frame was delivered (the watchdog's
    "is audio still arriving" check), or None before the first.
    """

    frames_sent: int = 0
    frames_dropped: int = 0
    overflows: int = 0
    last_frame_time: float | None = None
    samplerate: int | None = None
    channels: int | None = None


class _Capture:
    """Turns PortAudio input blocks into 960-byte frames on the trio thread."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        stats: CaptureStatistics,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self.send = send
        self.stats = stats
        self.token = token
        self.resampler: Resampler | None = None  # set by configure() once the stream is open
        self.framer = Framer()
        self.receiver_gone = trio.Event()
        self._limiter = _RateLimit()
        self._reported = (0, 0)

    def configure(self, rate: int) -> None:
        self.resampler = Resampler(rate, RATE, channels=1)

    def callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        # PortAudio thread: copy the block and hand it over; never block, never raise.
        with contextlib.suppress(Exception):  # RunFinishedError once trio has ended
            self.token.run_sync_soon(self.deliver, indata.copy(), bool(status.input_overflow))

    def deliver(self, block: np.ndarray, overflowed: bool) -> None:
        """Trio thread: downmix, resample to 24 kHz, frame, send without waiting."""
        if self.receiver_gone.is_set() or self.resampler is None:
            return  # a late block, after the stream or the receiver ended
        stats = self.stats
        if overflowed:
            stats.overflows += 1
        pcm = float_to_pcm16(self.resampler.process(to_mono(block)))
        for frame in self.framer.push(pcm):
            try:
                self.send.send_nowait(frame)
            except trio.WouldBlock:
                stats.frames_dropped += 1  # policy: a full uplink drops the newest frame
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.receiver_gone.set()  # nobody listens any more: capture ends
                return
            stats.frames_sent += 1
            stats.last_frame_time = trio.current_time()
        counts = (stats.frames_dropped, stats.overflows)
        if counts != self._reported and self._limiter.ready():
            log.warning(
                "capture: %d frames dropped (uplink full), %d input overflows so far", *counts
            )
            self._reported = counts


async def run_capture(
    send: trio.MemorySendChannel[bytes],
    device: DeviceInfo,
    *,
    block_ms: int = 20,
    latency: float | str | None = None,
    samplerate: int | None = None,
    stats: CaptureStatistics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Record ``device`` and send 20 ms frames of 24 kHz mono PCM16 (960 bytes) to ``send``.

    Opens the device at its default rate (``samplerate`` overrides; 48000 and 44100 are tried if
    it refuses) with up to two channels, downmixed. Runs until cancelled or until the receiving
    end is closed; ``send`` is closed on the way out, so the end of the stream flows downstream.
    A device that stops on its own (unplugged) raises :class:`RuntimeFailure`.

    Policy when the uplink channel is full: capture never blocks; the newest frame is dropped and
    counted in ``stats.frames_dropped`` (with a warning at most once a second).
    """
    stats = stats if stats is not None else CaptureStatistics()
    async with send:
        sd = _sd()
        token = trio.lowlevel.current_trio_token()
        channels = max(1, min(2, device.max_input_channels))
        watch = _StreamWatch(token)
        capture = _Capture(send, stats, token)
        stream, rate = await trio.to_thread.run_sync(
            lambda: _open_stream(
                sd.InputStream,
                device,
                "input",
                _candidate_rates(device, samplerate),
                block_ms,
                channels=channels,
                dtype="float32",
                latency=latency,
                callback=capture.callback,
                finished_callback=watch.finished_callback,
            )
        )
        try:
            capture.configure(rate)
            stats.samplerate, stats.channels = rate, channels
            await trio.to_thread.run_sync(_start, stream, device, "input")
            log.info(
                "capturing from %s at %d Hz, %d channel(s), latency %.0f ms",
                device.describe(),
                rate,
                channels,
                stream.latency * 1000,
            )
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, capture.receiver_gone, nursery.cancel_scope)
                await watch.stopped.wait()
                nursery.cancel_scope.cancel()
            if watch.stopped.is_set():
                raise RuntimeFailure(f"input device {device.describe()} stopped delivering audio")
        finally:
            await watch.close(stream)


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- playback -----------------------------------------------------------------------------------


@dataclass
class PlaybackStatistics:
    """Playback counters (written by the PortAudio callback, read anywhere).

    ``underruns``: a reply ran out of audio mid-way and silence was played until more came
    (also counted in the PlayoutBuffer's statistics). ``output_underflows``: PortAudio reported
    the device itself was starved (the callback was late). ``callback_errors``: exceptions caught
    in the callback (silence was played instead).
    """

    callbacks: int = 0
    underruns: int = 0
    output_underflows: int = 0
    callback_errors: int = 0
    samplerate: int | None = None
    channels: int | None = None


class _Output:
    """State of the output callback, which runs on PortAudio's thread.

    Each call pulls 10 ms blocks of 24 kHz audio from the PlayoutBuffer (zeros when it is empty)
    through a streaming resampler into a device-rate FIFO until the FIFO holds ``frames``
    samples; a streaming resampler does not return exactly ``frames`` per call (libsoxr emits in
    bursts of ~35 ms), so the FIFO carries the difference. Sample arrays are preallocated; only
    the resampler allocates its output.
    """

    PULL_SAMPLES = RATE // 100  # 10 ms at 24 kHz

    def __init__(self, buffer: PlayoutBuffer, stats: PlaybackStatistics) -> None:
        self.buffer = buffer
        self.stats = stats
        self.resampler: Resampler | None = None  # set by configure() once the stream is open
        self.pull = np.zeros(self.PULL_SAMPLES, dtype=np.int16)
        self.fifo = np.zeros(0, dtype=np.int16)
        self.fifo_len = 0
        self.playing = False
        #: Times a reply ran dry (incremented here only; the trio side decides if it was mid-way).
        self.dry_events = 0

    def configure(self, rate: int) -> None:
        self.resampler = Resampler(RATE, rate, channels=1)
        self.fifo = np.zeros(rate, dtype=np.int16)  # 1 s at the device rate: far more than needed

    def callback(self, outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        try:
            self.stats.callbacks += 1
            if status.output_underflow:
                self.stats.output_underflows += 1
            self._fill(frames)
            n = min(frames, self.fifo_len)
            outdata[:n] = self.fifo[:n, np.newaxis]  # mono -> every channel
            outdata[n:] = 0
            rest = self.fifo_len - n
            self.fifo[:rest] = self.fifo[n : self.fifo_len]
            self.fifo_len = rest
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
            else:
                self.playing = True
            y = resampler.process(pull)
            m = min(len(y), len(self.fifo) - self.fifo_len)
            self.fifo[self.fifo_len : self.fifo_len + m] = y[:m]
            self.fifo_len += m


async def run_playback(
    receive: trio.MemoryReceiveChannel[AudioChunk],
    buffer: PlayoutBuffer,
    device: DeviceInfo,
    *,
    latency: float | str | None = 0.03,
    drain_timeout: float = 65.0,
    samplerate: int | None = None,
    stats: PlaybackStatistics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Play the chunks from ``receive`` on ``device`` through ``buffer``.

    Opens the device at its default rate (``samplerate`` overrides; 48000 and 44100 are tried if
    it refuses) with up to two channels (mono duplicated); ``latency`` is PortAudio's suggested
    output latency (small boards need ~30 ms). Chunks go into ``buffer`` as they come (its policy
    when full: drop the oldest, count it; this task never waits on the speaker). When ``receive``
    closes, waits up to ``drain_timeout`` for the buffer to play out, then closes the stream.
    The samples handed to the device per reply item are counted by ``buffer`` (``played_samples``).
    A device that stops on its own raises :class:`RuntimeFailure`.
    """
    stats = stats if stats is not None else PlaybackStatistics()
    async with receive:
        sd = _sd()
        token = trio.lowlevel.current_trio_token()
        channels = max(1, min(2, device.max_output_channels))
        watch = _StreamWatch(token)
        output = _Output(buffer, stats)
        stream, rate = await trio.to_thread.run_sync(
            lambda: _open_stream(
                sd.OutputStream,
                device,
                "output",
                _candidate_rates(device, samplerate),
                None,
                channels=channels,
                dtype="int16",
                latency=latency,
                callback=output.callback,
                finished_callback=watch.finished_callback,
            )
        )
        try:
            output.configure(rate)
            stats.samplerate, stats.channels = rate, channels
            await trio.to_thread.run_sync(_start, stream, device, "output")
            log.info(
                "playing to %s at %d Hz, %d channel(s), latency %.0f ms",
                device.describe(),
                rate,
                channels,
                stream.latency * 1000,
            )
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, watch.stopped, nursery.cancel_scope)
                nursery.start_soon(_report_playback, stats)
                await _feed(receive, buffer, output, stats)
                # End of stream: let the buffer, the FIFO and the device play out.
                with trio.move_on_after(drain_timeout):
                    while buffer.queued_samples() > 0:
                        await trio.sleep(0.01)
                    await trio.sleep(stream.latency + 0.1)
                nursery.cancel_scope.cancel()
            if watch.stopped.is_set():
                raise RuntimeFailure(f"output device {device.describe()} stopped playing")
        finally:
            await watch.close(stream)


async def _feed(
    receive: trio.MemoryReceiveChannel[AudioChunk],
    buffer: PlayoutBuffer,
    output: _Output,
    stats: PlaybackStatistics,
) -> None:
    """Move chunks into the buffer; notice replies that ran dry mid-way (underruns)."""
    seen_dry = output.dry_events
    last_item: str | None = None
    async for chunk in receive:
        dry = output.dry_events
        buffer.push(chunk.item_id, chunk.pcm)
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
