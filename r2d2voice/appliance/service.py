"""``r2d2voice run``: the microphone and the speaker until SIGTERM, as a systemd service."""

from __future__ import annotations

import logging
from typing import Any

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.signals import with_signals
from r2d2voice.system.config import Settings
from r2d2voice.system.notify import Notifier

log = logging.getLogger("r2d2voice")


class ServiceConsole:
    """Transcripts and status to the log (the journal under systemd); status also to
    systemd's ``STATUS=``."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.last = ""

    def transcript(self, role: str, text: str) -> None:
        log.info("%s: %s", "you" if role == "user" else "r2", text)

    def status(self, text: str) -> None:
        if text != self.last:
            self.last = text
            log.debug("status: %s", text)
            self.notifier.status(text)


def run_command(settings: Settings, *, url: str | None) -> None:
    """Talk through the configured devices until SIGTERM/SIGINT, then drain and return.

    Under systemd: ``READY=1`` once the session is configured and capture runs, ``STATUS=``
    as the conversation goes, ``WATCHDOG=1`` while capture frames arrive, ``STOPPING=1`` once.
    """
    from r2d2voice.appliance.compose import converse
    from r2d2voice.appliance.sinks import DeviceSink
    from r2d2voice.appliance.sources import DeviceSource
    from r2d2voice.audio.devices import resolve_device
    from r2d2voice.system.notify import run_watchdog, watchdog_interval

    mic = resolve_device(settings.input_device, "input")
    speaker = resolve_device(settings.output_device, "output")
    notifier = Notifier()
    console = ServiceConsole(notifier)
    source = DeviceSource(mic)
    sink = DeviceSink(speaker, latency=settings.output_latency)
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
            log.info("ready: listening on %s, speaking on %s", mic.name, speaker.name)

        async def body() -> Any:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(announce_ready)
                if interval:
                    nursery.start_soon(run_watchdog, notifier, source.healthy, interval)
                notifier.status("connecting")
                outcome = await converse(settings, source, sink, url=url, console=console,
                                         stopper=stopper, on_configured=configured.set,
                                         metadata={"command": "run", "input": mic.name,
                                                   "output": speaker.name})
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
