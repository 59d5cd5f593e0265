"""Devices that come and go: the waiting loop, rescans and health, on trio's MockClock.

The loop (``availability.keep_device``) is driven through its two ports, a finder and a stream
session, standing in for PortAudio (the real devices are in test_run_live.py, where a sound
server is started late, killed and restarted under a running ``run``).
"""

from __future__ import annotations

import logging
import threading

import pytest
import trio

from r2d2voice.appliance.sources import DeviceSource
from r2d2voice.audio import portaudio
from r2d2voice.audio.availability import DeviceStates, keep_device, label
from r2d2voice.audio.devices import DeviceInfo, DeviceUnavailable
from r2d2voice.errors import ConfigError

MIC = DeviceInfo(3, "QuadCast", "ALSA", 2, 0, 48000.0, False, False)


class Room:
    """Where the microphone is (or is not), as the finder and the sessions see it."""

    def __init__(self) -> None:
        self.present = False
        self.looks: list[tuple[float, bool]] = []  # (when, rescanned)
        self.sessions: list[float] = []
        self.fail_after: float | None = None  # a session's device fails after this long
        self.end = trio.Event()

    async def find(self, spec, kind, *, previous=None, rescan=False, capture_running=False):
        self.looks.append((trio.current_time(), rescan))
        if not self.present:
            raise DeviceUnavailable(f"no input device matches {spec!r}; inputs: none")
        return MIC

    async def session(self, device: DeviceInfo, running) -> None:
        self.sessions.append(trio.current_time())
        running()
        if self.fail_after is not None:
            await trio.sleep(self.fail_after)
            raise DeviceUnavailable(f"input device {device.describe()} stopped delivering audio")
        await self.end.wait()


async def test_a_missing_microphone_is_waited_for_said_once_then_used(autojump_clock, caplog):
    room, changes = Room(), []
    states = DeviceStates(on_change=lambda: changes.append(states.status))
    with caplog.at_level(logging.INFO, logger="r2d2voice.audio.availability"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_device("input", "QuadCast", room.session,
                                                   states=states, find=room.find))
            await trio.sleep(9.0)
            assert states.status == "waiting for microphone 'QuadCast'"
            room.present = True  # plugged in
            await trio.sleep(2.5)
            assert states.status is None and len(room.sessions) == 1
            room.end.set()
    # looked every 2 s, the first time in PortAudio's cached list, then in fresh scans
    times = [t for t, _ in room.looks]
    assert times == pytest.approx([2.0 * i for i in range(len(times))])
    assert [rescan for _, rescan in room.looks] == [False] + [True] * (len(times) - 1)
    assert changes == ["waiting for microphone 'QuadCast'", None]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "microphone 'QuadCast' unavailable (no input device matches 'QuadCast'; inputs: none): "
        "waiting for it, looking every 2 s",
        "microphone 'QuadCast' is back: 3 'QuadCast'",
    ]


async def test_a_device_that_worked_is_reopened_at_once_then_waited_for(autojump_clock, caplog):
    room = Room()
    room.present, room.fail_after = True, 10.0  # each stream dies after 10 s
    states, seen = DeviceStates(), []
    with caplog.at_level(logging.INFO, logger="r2d2voice.audio.availability"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_device("input", "QuadCast", room.session,
                                                   states=states, first=MIC, find=room.find))
            for _ in range(25):
                await trio.sleep(1.0)
                seen.append(states.status)
            nursery.cancel_scope.cancel()
    # it worked 10 s, failed, was opened again at once; failing again soon, it is waited for
    # (said so, one poll) before the next try
    assert room.sessions == [0.0, 10.0, 22.0]
    assert seen[9:12] == [None, None, None]
    assert seen[20] == "waiting for microphone 'QuadCast'" and seen[22] is None
    assert [r.getMessage() for r in caplog.records] == [
        "microphone 'QuadCast' failed (input device 3 'QuadCast' stopped delivering audio): "
        "opening it again",
        "microphone 'QuadCast' unavailable (input device 3 'QuadCast' stopped delivering "
        "audio): waiting for it, looking every 2 s",
        "microphone 'QuadCast' is back: 3 'QuadCast'",
    ]


async def test_an_ambiguous_name_cannot_be_waited_for(autojump_clock):
    async def ambiguous(*args, **kwargs):
        raise ConfigError("input device 'usb' is ambiguous: matches 1 'USB a', 2 'USB b'")

    with pytest.raises(ConfigError, match="ambiguous"):
        await keep_device("input", "usb", Room().session, find=ambiguous)


def test_status_names_what_the_run_waits_for():
    states = DeviceStates()
    states.waiting("output", None, "gone")
    states.waiting("input", "QuadCast", "gone")
    assert states.status == "waiting for microphone 'QuadCast' and the default speaker"
    assert label(" ", "input") == "the default microphone"
    states.available("input", MIC)
    assert states.status == "waiting for the default speaker"


# -- rescans ----------------------------------------------------------------------------------


async def test_a_rescan_waits_for_the_playing_speaker_then_runs(autojump_clock):
    pa = portaudio.host()
    rescans = []
    pa.reinitialize = lambda: rescans.append(pa.open_streams)  # (in a worker thread)
    pa.opened()  # the speaker plays a reply

    assert await pa.rescan(capture_running=False, timeout=1.0) is False  # it is still playing
    assert rescans == [] and not pa.rescan_wanted and pa.generation == 0

    async def reply_ends() -> None:
        await trio.sleep(0.5)
        pa.closed()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply_ends)
        assert await pa.rescan(capture_running=False, timeout=1.0) is True
    assert trio.current_time() == pytest.approx(1.5)  # as soon as the reply ended
    assert rescans == [0] and pa.generation == 1  # with no stream open


async def test_a_rescan_for_the_speaker_pauses_the_microphone_rarely(autojump_clock):
    pa = portaudio.host()
    pa.reinitialize = lambda: None
    rescans = []

    async def microphone() -> None:
        """Holds its stream; closes it when asked to pause, opens it after the rescan."""
        pa.opened()
        while True:
            await pa.changed()
            if pa.rescan_wanted and pa.pause_capture:
                pa.closed()
                await pa.wait_no_rescan()
                pa.opened()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(microphone)
        await trio.sleep(0)
        outcomes = []
        for _ in range(12):  # the speaker looks every 2 s for 24 s
            outcomes.append(await pa.rescan(capture_running=True, timeout=1.0))
            if outcomes[-1]:
                rescans.append(trio.current_time())
            await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    # the microphone paused at 0, 2 s later, 4 s after that, then 8 s after that...
    assert rescans == pytest.approx([0.0, 2.0, 6.0, 14.0])
    assert outcomes.count(True) == 4


# -- health (the watchdog's question) ---------------------------------------------------------


async def test_a_source_waiting_for_its_microphone_is_healthy(autojump_clock):
    source = DeviceSource("QuadCast")
    source.running.set()  # deliberately waiting: run_capture announced it
    source._started_at = trio.current_time()
    for _ in range(10):  # the waiting loop looks every 2 s
        await trio.sleep(2.0)
        source.stats.last_progress = trio.current_time()
        assert source.healthy()
    await trio.sleep(6.0)  # the loop stopped looking (stuck): no longer vouched for
    assert not source.healthy()


def test_a_portaudio_call_that_never_returns_is_unhealthy(monkeypatch):
    source = DeviceSource("QuadCast")
    inside, release = threading.Event(), threading.Event()

    def hung_call() -> None:
        with portaudio.pa_lock():  # e.g. starting a stream whose sound server died
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=hung_call)
    thread.start()
    try:
        inside.wait(10)
        assert not portaudio.stuck(5.0)
        real = portaudio.time.monotonic
        monkeypatch.setattr(portaudio.time, "monotonic", lambda: real() + 6.0)
        assert portaudio.stuck(5.0)
        assert not source.healthy()
    finally:
        release.set()
        thread.join()
    assert not portaudio.stuck(5.0)
