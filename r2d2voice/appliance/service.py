"""``r2d2voice run``: the microphone and the speaker until SIGTERM, as a systemd service."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.signals import with_signals
from r2d2voice.audio.availability import DeviceStates
from r2d2voice.system.config import Settings
from r2d2voice.system.notify import Notifier

if TYPE_CHECKING:
    from r2d2voice.storage.recorder import StoreStatus
    from r2d2voice.storage.shipping.forever import ShipStatus

log = logging.getLogger("r2d2voice")


class ServiceConsole:
    """Transcripts and status to the log (the journal under systemd); status also to
    systemd's ``STATUS=``. While the run waits for a sound device, STATUS= says that instead
    ("waiting for microphone 'QuadCast'"), and the conversation's status once it is back.
    While records wait for a full disk (or were lost), the store's state follows:
    "listening · database full: 3 records waiting"; so does the fleet shipper's while it is
    not up to date: "listening · fleet server unreachable, retrying"."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.last = ""
        self.said = "connecting"
        self.store_note = ""
        self.ship_note = ""
        self.devices = DeviceStates(on_change=self.refresh)

    def transcript(self, role: str, text: str) -> None:
        log.info("%s: %s", "you" if role == "user" else "r2", text)

    def status(self, text: str) -> None:
        self.said = text
        shown = self.devices.status or text
        for note in (self.store_note, self.ship_note):
            if note:
                shown = f"{shown} · {note}"
        if shown != self.last:
            self.last = shown
            log.debug("status: %s", shown)
            self.notifier.status(shown)

    def refresh(self) -> None:
        self.status(self.said)

    def store_status(self, status: StoreStatus) -> None:
        """The recorder's state changed (kept across the conversation's status updates)."""
        self.store_note = status.note
        self.refresh()

    def ship_status(self, status: ShipStatus) -> None:
        """The fleet shipper tried (kept across the conversation's status updates)."""
        self.ship_note = status.note
        self.refresh()


def run_command(settings: Settings, *, url: str | None,
                on_wake: Callable[[], None] | None = None) -> None:
    """Talk through the configured devices until SIGTERM/SIGINT, then drain and return.

    Under systemd: ``READY=1`` once the session is configured and capture runs or deliberately
    waits for its device, ``STATUS=`` as the conversation goes (or the device waited for),
    ``WATCHDOG=1`` while capture makes progress (frames arrive, or a missing device is being
    looked for), ``STOPPING=1`` once. A missing device is waited for, an ambiguous one is a
    ConfigError (exit 3).
    ``r2d2voice wake`` (the control socket, or SIGUSR1) calls ``on_wake``.
    """
    from r2d2voice.appliance.compose import check_listening, converse
    from r2d2voice.appliance.sinks import DeviceSink
    from r2d2voice.appliance.sources import DeviceSource
    from r2d2voice.audio.availability import device_at_start, label
    from r2d2voice.system.control import serve_control
    from r2d2voice.system.notify import run_watchdog, watchdog_interval

    check_listening(settings)
    mic = device_at_start(settings.input_device, "input")
    speaker = device_at_start(settings.output_device, "output")
    mic_name = mic.name if mic else label(settings.input_device, "input")
    speaker_name = speaker.name if speaker else label(settings.output_device, "output")
    notifier = Notifier()
    console = ServiceConsole(notifier)
    source = DeviceSource(mic or settings.input_device, states=console.devices)
    sink = DeviceSink(speaker or settings.output_device, latency=settings.output_latency,
                      states=console.devices)
    stopper = Stopper()
    stopper.on_stop(notifier.stopping)
    interval = watchdog_interval()

    async def main() -> Any:
        configured = trio.Event()

        async def announce_ready() -> None:
            await configured.wait()
            await source.running.wait()
            notifier.ready()
            console.status("listening")
            log.info("ready: listening on %s, speaking on %s%s", mic_name, speaker_name,
                     f" ({console.devices.status})" if console.devices.status else "")

        async def body() -> Any:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(announce_ready)
                nursery.start_soon(functools.partial(serve_control, on_wake or _already_listening))
                if interval:
                    nursery.start_soon(run_watchdog, notifier, source.healthy, interval)
                console.status("connecting")
                outcome = await converse(settings, source, sink, url=url, console=console,
                                         stopper=stopper, on_configured=configured.set,
                                         on_store_status=console.store_status,
                                         on_ship_status=console.ship_status,
                                         metadata={"command": "run", "input": mic_name,
                                                   "output": speaker_name})
                nursery.cancel_scope.cancel()
            return outcome

        return await with_signals(stopper, body)

    try:
        outcome = trio.run(main)
    finally:
        if stopper.reason is None:  # a signal already sent STOPPING=1 (the on_stop hook)
            notifier.stopping()
        notifier.close()
    log.info("stopped; session %s", outcome.session_id)


def _already_listening() -> None:
    log.info("wake: already listening (R2D2_LISTEN=always)")
