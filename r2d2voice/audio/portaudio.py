"""PortAudio through sounddevice: its one lock, stream calls in worker threads, streams that end
on their own, and device rescans.

sounddevice is imported lazily, inside functions: importing it loads PortAudio and scans every
ALSA device, which ``r2d2voice --help`` (or a WAV replay) must not pay for or fail on.

PortAudio's API is not thread-safe, and opening, starting, stopping or closing a stream can take
tens of milliseconds: those calls run in worker threads, one at a time under :data:`pa_lock`.
PortAudio lists the devices once, at ``Pa_Initialize``, so a device plugged in (or a sound server
started) later is invisible until a *rescan* (``Pa_Terminate`` + ``Pa_Initialize``), which closes
every open stream. :class:`Host` (one per trio run) makes rescans wait until no stream is open
(the speaker's is closed whenever nothing plays) and asks the microphone, rarely, to pause.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import trio

from r2d2voice.errors import ConfigError, RuntimeFailure

log = logging.getLogger(__name__)

Kind = Literal["input", "output"]

#: Rates tried, after the device's default, when a device refuses to open at its default rate.
FALLBACK_RATES = (48000, 44100)
#: A rescan that would close a running microphone happens at most this often, doubling from
#: RESCAN_PAUSE_MIN up to RESCAN_PAUSE_MAX while the device looked for stays missing.
RESCAN_PAUSE_MIN = 2.0
RESCAN_PAUSE_MAX = 60.0
#: Closing a stream (also on the way out) waits this long at most.
CLOSE_DEADLINE = 2.0

_lock = threading.Lock()
_busy_since: float | None = None  # time.monotonic() when the call holding the lock began


@contextlib.contextmanager
def pa_lock() -> Iterator[None]:
    """Hold PortAudio for one call (worker threads, device listing): one call at a time."""
    global _busy_since
    with _lock:
        _busy_since = time.monotonic()
        try:
            yield
        finally:
            _busy_since = None


def stuck(limit: float) -> bool:
    """A PortAudio call has not returned for ``limit`` seconds (PortAudio can hang, e.g.
    starting a stream whose sound server died): nothing in-process can fix that, so the run
    reports itself unhealthy and the watchdog restarts it."""
    since = _busy_since
    return since is not None and time.monotonic() - since > limit


class DeviceUnavailable(RuntimeFailure):
    """A sound device that is missing, gone or failing *now*: waiting may fix it (exit 1 if it
    ever escapes; ``run`` waits for the device instead)."""


def sounddevice() -> ModuleType:
    """Import sounddevice; a missing PortAudio library is a configuration error (exit 3)."""
    try:
        import sounddevice as sd
    except OSError as exc:
        raise ConfigError(
            "PortAudio library not found: install it with `apt install libportaudio2`"
        ) from exc
    except Exception as exc:  # sounddevice.PortAudioError from Pa_Initialize
        raise ConfigError(f"PortAudio failed to initialise: {exc}") from exc
    return sd


@dataclass(frozen=True)
class StreamPlan:
    """How to open one stream: the device index, its kind, rates to try, block size in ms
    (None: PortAudio picks) and the rest of the sounddevice arguments."""

    index: int
    label: str
    kind: Kind
    rates: tuple[int, ...]
    block_ms: int | None
    kwargs: dict[str, Any]


def candidate_rates(default_samplerate: float, samplerate: int | None) -> tuple[int, ...]:
    if samplerate is not None:
        return (int(samplerate),)
    rates = [int(default_samplerate)] if default_samplerate > 0 else []
    return (*rates, *(r for r in FALLBACK_RATES if r not in rates))


def open_stream(plan: StreamPlan) -> tuple[Any, int]:
    """Open (not start) a stream at the first rate the device accepts: (stream, rate).

    Worker thread only. A device that refuses every rate is :class:`DeviceUnavailable` (busy,
    unplugged, or its sound server gone).
    """
    sd = sounddevice()
    factory = sd.InputStream if plan.kind == "input" else sd.OutputStream
    errors = []
    with pa_lock():
        for rate in plan.rates:
            blocksize = 0 if plan.block_ms is None else max(1, rate * plan.block_ms // 1000)
            try:
                stream = factory(device=plan.index, samplerate=rate, blocksize=blocksize,
                                 **plan.kwargs)
            except Exception as exc:  # PortAudioError; ValueError once the index is gone
                errors.append(f"{rate} Hz: {exc}")
            else:
                return stream, rate
    raise DeviceUnavailable(f"cannot open {plan.kind} device {plan.label} ({'; '.join(errors)})")


def start(stream: Any, label: str) -> None:
    """Start a stream (worker thread); a refusal is :class:`DeviceUnavailable`."""
    with pa_lock():
        try:
            stream.start()
        except Exception as exc:  # PortAudioError: busy or vanished
            raise DeviceUnavailable(f"cannot start {label}: {exc}") from exc


def close(stream: Any) -> None:
    with pa_lock():
        stream.close(ignore_errors=True)


class StreamWatch:
    """Tells the trio side that PortAudio ended a stream we did not close (device gone).

    ``expected`` is set before a deliberate close, so its finished callback is no alarm.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self.expected = False
        self.stopped = trio.Event()

    def finished_callback(self) -> None:  # PortAudio thread
        if self.expected:
            return
        with contextlib.suppress(Exception):  # RunFinishedError: trio is gone already
            self._token.run_sync_soon(self.stopped.set)

    async def start(self, stream: Any, label: str) -> None:
        """Start ``stream`` (worker thread)."""
        self.expected = False
        await trio.to_thread.run_sync(start, stream, label)

    async def close(self, stream: Any) -> None:
        """Close the stream in a worker thread, even while being cancelled, within
        ``CLOSE_DEADLINE`` (PortAudio returns within milliseconds; a call that hangs is left
        behind, and :func:`stuck` reports it)."""
        self.expected = True
        with trio.move_on_after(CLOSE_DEADLINE) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(close, stream, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.error("PortAudio did not close a stream within %g s", CLOSE_DEADLINE)


def _reinitialize() -> None:
    """Pa_Terminate + Pa_Initialize: a fresh device list (worker thread, no stream open).

    sounddevice sends the process's stderr to /dev/null while PortAudio probes ALSA (its probing
    prints dozens of lines); the log handlers are held meanwhile, so a log line written by another
    thread waits those few milliseconds instead of vanishing.
    """
    sd = sounddevice()
    with pa_lock(), _holding(logging.getLogger().handlers):
        if sd._initialized > 0:
            sd._terminate()
        sd._initialize()


@contextlib.contextmanager
def _holding(handlers: list[logging.Handler]) -> Iterator[None]:
    for handler in handlers:
        handler.acquire()
    try:
        yield
    finally:
        for handler in reversed(handlers):
            handler.release()


class Host:
    """PortAudio's state in one trio run: open streams, rescans, pause requests.

    A rescan waits until no stream is open, and no stream opens while one is wanted
    (:attr:`rescan_wanted`). The speaker's stream is open only while it plays. The microphone
    closes its stream when :attr:`pause_capture` is set too, which happens for a rescan another
    device needs, at most once per backoff step (RESCAN_PAUSE_MIN doubling to
    RESCAN_PAUSE_MAX), since each costs a gap in the microphone's audio. Device indexes are
    valid within one :attr:`generation` (bumped by each rescan).
    """

    def __init__(self, reinitialize: Callable[[], None] | None = None) -> None:
        #: what a rescan runs in a worker thread (Pa_Terminate + Pa_Initialize)
        self.reinitialize = reinitialize or _reinitialize
        self.open_streams = 0
        self.generation = 0
        self.rescan_wanted = False
        self.pause_capture = False
        self._pause_backoff = RESCAN_PAUSE_MIN
        self._next_pause = float("-inf")
        self._changed = trio.Event()
        self._lock = trio.Lock()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Until the next change of :attr:`rescan_wanted`, :attr:`open_streams` or a rescan."""
        await self._changed.wait()

    def opened(self) -> None:
        self.open_streams += 1
        self._notify()

    def closed(self) -> None:
        self.open_streams -= 1
        self._notify()

    async def wait_no_rescan(self) -> None:
        """Until no rescan is wanted (a stream must not open while one waits)."""
        while self.rescan_wanted:
            await self.changed()

    async def open(self, plan: StreamPlan) -> tuple[Any, int]:
        """:func:`open_stream` in a worker thread, counted as open from before the call (a
        rescan must not run while an open is in flight); call :meth:`closed` after closing."""
        await self.wait_no_rescan()
        self.opened()
        try:
            return await trio.to_thread.run_sync(open_stream, plan)
        except BaseException:
            self.closed()
            raise

    async def rescan(self, *, capture_running: bool, timeout: float) -> bool:
        """Rescan the devices once no stream is open; False if that did not happen within
        ``timeout`` (the holders kept their streams) or the rescan failed.

        ``capture_running``: the microphone is open and would have to pause for this rescan.
        """
        now = trio.current_time()
        if capture_running and now < self._next_pause:
            return False
        async with self._lock:
            generation = self.generation
            self.rescan_wanted = True
            self.pause_capture = capture_running
            self._notify()
            try:
                with trio.move_on_after(timeout):
                    while self.open_streams > 0:
                        await self.changed()
                if self.open_streams > 0:
                    return False
                if self.generation != generation:
                    return True  # someone else rescanned meanwhile
                try:
                    await trio.to_thread.run_sync(self.reinitialize)
                except Exception as exc:  # PortAudioError: nothing to list yet
                    log.debug("device rescan failed: %s", exc)
                    return False
                self.generation += 1
                return True
            finally:
                if capture_running:
                    self._next_pause = trio.current_time() + self._pause_backoff
                    self._pause_backoff = min(RESCAN_PAUSE_MAX, 2 * self._pause_backoff)
                self.rescan_wanted = False
                self.pause_capture = False
                self._notify()

    def device_found(self) -> None:
        """A device looked for is back: the next pause for a rescan may come soon again."""
        self._pause_backoff = RESCAN_PAUSE_MIN
        self._next_pause = float("-inf")


_HOST: trio.lowlevel.RunVar[Host] = trio.lowlevel.RunVar("r2d2voice_portaudio_host")


def host() -> Host:
    """The :class:`Host` of the current trio run."""
    try:
        return _HOST.get()
    except LookupError:
        h = Host()
        _HOST.set(h)
        return h
