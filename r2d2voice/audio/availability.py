"""Waiting for sound devices: a missing, vanished or silent device is a passing condition.

:func:`keep_device` finds the device a setting names, runs a stream on it, and when the device
is missing or the stream ends (unplugged, sound server restarted, no audio for a while) says so
once, polls every :data:`POLL_SECONDS` (rescanning PortAudio's device list when needed) and
runs the stream again. :class:`DeviceStates` is what a run is waiting for, for the log and for
systemd's ``STATUS=``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from r2d2voice.audio.devices import DeviceInfo, resolve_device
from r2d2voice.audio.portaudio import DeviceUnavailable, Kind, host
from r2d2voice.system import events

log = logging.getLogger(__name__)

#: Seconds between two looks for a missing device.
POLL_SECONDS = 2.0
#: A device that fails again within this many polls of its last failure is waited for (and
#: said so once) rather than reopened at once.
RECENT_LOSS_POLLS = 10

ROLES: dict[Kind, str] = {"input": "microphone", "output": "speaker"}


def label(spec: str | int | None, kind: Kind) -> str:
    """How the log and STATUS= name the device a setting asks for."""
    role = ROLES[kind]
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return f"the default {role}"
    return f"{role} {str(spec).strip()!r}"


class DeviceStates:
    """The devices a run is waiting for; ``on_change`` is called (trio thread) when that set
    changes. Each change is logged once: a warning when a device goes missing, info when it is
    back."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.on_change = on_change
        self._waiting: dict[Kind, str] = {}

    def waiting(self, kind: Kind, spec: str | int | None, reason: str) -> None:
        if kind in self._waiting:
            log.debug("still waiting for %s: %s", self._waiting[kind], reason)
            return
        self._waiting[kind] = label(spec, kind)
        events.emit("device_lost", kind=kind, name="default" if spec is None else str(spec))
        log.warning("%s unavailable (%s): waiting for it, looking every %g s",
                    self._waiting[kind], reason, POLL_SECONDS)
        self._changed()

    def available(self, kind: Kind, device: DeviceInfo) -> None:
        what = self._waiting.pop(kind, None)
        if what is None:
            return
        log.info("%s is back: %s", what, device.describe())
        events.emit("device_back", kind=kind, name=device.name)
        self._changed()

    def is_waiting(self, kind: Kind) -> bool:
        return kind in self._waiting

    @property
    def status(self) -> str | None:
        """``waiting for microphone 'QuadCast'`` (and/or the speaker), or None."""
        if not self._waiting:
            return None
        return "waiting for " + " and ".join(self._waiting[k] for k in ("input", "output")
                                             if k in self._waiting)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def device_at_start(spec: str | int | None, kind: Kind) -> DeviceInfo | None:
    """The device ``spec`` names if it is there now, None if it is missing (to be waited for);
    an ambiguous name raises :class:`~r2d2voice.errors.ConfigError`. Blocking: call it before
    the event loop starts."""
    try:
        return resolve_device(spec, kind)
    except DeviceUnavailable as exc:
        log.info("%s is not there yet: %s", label(spec, kind), exc)
        return None


def _find(spec: str | int | None, kind: Kind, previous: DeviceInfo | None) -> DeviceInfo:
    """Worker thread: resolve ``spec``; the device used before wins an ambiguity that a second
    matching device (plugged in later) would cause."""
    from r2d2voice.audio.devices import list_devices
    from r2d2voice.errors import ConfigError

    devs = list_devices()
    try:
        return resolve_device(spec, kind, devs)
    except ConfigError:
        if previous is not None:
            same = [d for d in devs if d.name == previous.name and d.channels(kind) > 0]
            if len(same) == 1:
                return same[0]
        raise


async def find_device(spec: str | int | None, kind: Kind, *, previous: DeviceInfo | None = None,
                      rescan: bool = False, capture_running: bool = False) -> DeviceInfo:
    """The device ``spec`` names, from PortAudio's list (rescanned first if ``rescan``, when
    that can be done now; see :class:`~r2d2voice.audio.portaudio.Host`)."""
    if rescan:
        await host().rescan(capture_running=capture_running, timeout=POLL_SECONDS / 2)
    return await trio.to_thread.run_sync(_find, spec, kind, previous)


#: One stream's life on a device: calls ``running()`` once the device works, returns when the
#: stream is done for good, raises DeviceUnavailable when the device failed (to be found again).
Session = Callable[[DeviceInfo, Callable[[], None]], Awaitable[None]]
Finder = Callable[..., Awaitable[DeviceInfo]]


async def keep_device(
    kind: Kind,
    spec: str | int | None,
    session: Session,
    *,
    states: DeviceStates | None = None,
    first: DeviceInfo | None = None,
    on_progress: Callable[[], None] | None = None,
    on_waiting: Callable[[], None] | None = None,
    find: Finder = find_device,
    poll: float = POLL_SECONDS,
    capture_running: Callable[[], bool] = lambda: False,
) -> None:
    """Run ``session`` on the device ``spec`` names until it returns, across device losses.

    ``first``: a device already resolved (skips the first lookup). ``on_progress`` is called at
    every step (a lookup, a poll): the loop is alive and doing what it should. ``on_waiting`` is
    called when the run starts waiting for the device (the caller drops what it would have
    played). A device that worked a while and fails is opened again at once; one that is
    missing, or fails again soon, is waited for: said once (``states``), then looked for every
    ``poll`` seconds in a freshly scanned list. ``session`` calls ``running()`` once the device
    works (the microphone: once audio arrives), which ends the wait. An ambiguous name is a
    :class:`~r2d2voice.errors.ConfigError`, raised.
    """
    states = states or DeviceStates()
    previous: DeviceInfo | None = None
    device = first
    rescan = False
    last_loss = float("-inf")
    while True:
        if on_progress:
            on_progress()
        started = trio.current_time()
        try:
            if device is None:
                device = await find(spec, kind, previous=previous, rescan=rescan,
                                    capture_running=capture_running())
            previous = device

            def running(found: DeviceInfo = device) -> None:
                if states.is_waiting(kind):
                    host().device_found()
                states.available(kind, found)

            started = trio.current_time()
            await session(device, running)
            return
        except DeviceUnavailable as exc:
            now = trio.current_time()
            ran = device is not None and now - started >= poll
            recent = now - last_loss < RECENT_LOSS_POLLS * poll
            last_loss = now
            device = None
            if ran and not recent and not states.is_waiting(kind):
                # it worked a while: open it again at once (a sound server restarting is back
                # within a second), from PortAudio's cached list
                log.warning("%s failed (%s): opening it again", label(spec, kind), exc)
                rescan = False
                continue
            states.waiting(kind, spec, str(exc))
            if on_waiting:
                on_waiting()
            rescan = True  # from now on, look in a fresh list
            await trio.sleep(poll)
