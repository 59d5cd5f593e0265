"""``r2d2voice run``: the microphone and the speaker until SIGTERM, as a systemd service."""

from __future__ import annotations

import logging
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
        #: "no echo canceller: half duplex" when R2D2_ECHO=aec cannot be had
        self.echo_note = ""
        self.devices = DeviceStates(on_change=self.refresh)

    def transcript(self, role: str, text: str) -> None:
        log.info("%s: %s", "you" if role == "user" else "r2", text)

    def status(self, text: str) -> None:
        self.said = text
        shown = self.devices.status or text
        for note in (self.echo_note, self.store_note, self.ship_note):
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


def run_command(settings: Settings, *, url: str | None) -> None:
    """Talk through the configured devices until SIGTERM/SIGINT, then drain and return.

    Under systemd: ``READY=1`` once capture runs or deliberately waits for its device (and, when
    always listening, the session is configured), ``STATUS=`` as the conversation goes (or the
    device waited for), ``WATCHDOG=1`` while capture makes progress (frames arrive, or a
    missing device is being looked for), ``STOPPING=1`` once. A missing device is waited for,
    an ambiguous one is a ConfigError (exit 3).

    ``R2D2_LISTEN=always``: one conversation from start to stop; ``r2d2voice wake`` (the
    control socket, or SIGUSR1) only logs that it is already listening. ``wake``: the
    microphone goes to the wake-word detector only, and each wake (the word, ``r2d2voice
    wake``) opens a conversation (appliance/gate.py); ``STATUS=`` says "waiting for 'hey
    mycroft'", then "in conversation (…)". With a budget cap spent, STATUS= says so ("daily
    budget reached ($1.00 of $1.00), back tomorrow") and READY=1 comes all the same.
    """
    from r2d2voice.appliance.compose import RunOptions, check_listening, hold
    from r2d2voice.appliance.endpoints import plan_service
    from r2d2voice.appliance.gate import WakeTrigger
    from r2d2voice.appliance.protocols import check_duplex
    from r2d2voice.appliance.sinks import DeviceSink
    from r2d2voice.appliance.sources import DeviceSource
    from r2d2voice.audio.availability import device_at_start, label
    from r2d2voice.audio.echo import echo_stage
    from r2d2voice.system.control import serve_control
    from r2d2voice.system.notify import run_watchdog, watchdog_interval

    check_listening(settings)
    # GPT-Live behind the half-duplex gate is refused before a device is opened
    check_duplex(plan_service(settings, url), settings, live_source=True)
    mic = device_at_start(settings.input_device, "input")
    speaker = device_at_start(settings.output_device, "output")
    mic_name = mic.name if mic else label(settings.input_device, "input")
    speaker_name = speaker.name if speaker else label(settings.output_device, "output")
    notifier = Notifier()
    console = ServiceConsole(notifier)
    echo = echo_stage(settings.echo_mode())  # None: half duplex, off, or no livekit (warned)
    if echo is None and settings.echo_mode() == "aec":
        console.echo_note = "no echo canceller: half duplex"
    source = DeviceSource(mic or settings.input_device, states=console.devices,
                          echo=echo.canceller if echo else None)
    sink = DeviceSink(speaker or settings.output_device, latency=settings.output_latency,
                      states=console.devices, tap=echo.tap if echo else None)
    stopper = Stopper()
    stopper.on_stop(notifier.stopping)
    interval = watchdog_interval()
    metadata = {"command": "run", "input": mic_name, "output": speaker_name}

    budget: list[str | None] = [None]  # what STATUS= says while the budget is spent

    async def announce_ready(configured: trio.Event | None, doing: str) -> None:
        if configured is not None:
            await configured.wait()
            if budget[0] is None:
                console.status("listening")
        await source.running.wait()
        notifier.ready()
        waiting = console.devices.status or budget[0]
        log.info("ready: %s on %s, speaking on %s%s", doing, mic_name, speaker_name,
                 f" ({waiting})" if waiting else "")

    async def listen(nursery: trio.Nursery) -> Any:
        wake = settings.listen == "wake"
        trigger = WakeTrigger() if wake else None

        def on_wake() -> str | None:
            """A wake from outside; while the microphone is missing it can do nothing."""
            if console.devices.is_waiting("input"):
                why = f"it is {console.devices.status}; it cannot hear anyone until it is back"
                log.warning("wake: ignored, %s", why)
                return why
            if trigger is None:
                return _already_listening()
            trigger.wake()
            return None

        await nursery.start(serve_control, on_wake)
        if wake:  # no session while waiting: ready once the microphone runs (or is waited for)
            nursery.start_soon(announce_ready, None,
                               f"waiting for the wake word ({settings.wake_word})")
            configured = None
        else:
            configured = trio.Event()
            nursery.start_soon(announce_ready, configured, "listening")
            console.status("connecting")

        def on_budget(closed: str | None) -> None:
            budget[0] = closed
            if closed is not None and configured is not None:
                configured.set()  # ready: it deliberately waits for the budget

        return await hold(settings, source, sink, RunOptions(
            url=url, console=console, stopper=stopper, metadata=metadata, trigger=trigger,
            on_configured=configured.set if configured is not None else None,
            on_store_status=console.store_status, on_ship_status=console.ship_status,
            on_budget=on_budget, devices=console.devices, on_wake=on_wake))

    async def main() -> Any:
        async def body() -> Any:
            async with trio.open_nursery() as nursery:
                if interval:
                    nursery.start_soon(run_watchdog, notifier, source.healthy, interval)
                outcome = await listen(nursery)
                nursery.cancel_scope.cancel()
            return outcome

        return await with_signals(stopper, body)

    try:
        outcome = trio.run(main)
    finally:
        if stopper.reason is None:  # a signal already sent STOPPING=1 (the on_stop hook)
            notifier.stopping()
        notifier.close()
    if settings.listen == "wake":
        count = len(outcome.conversations)
        log.info("stopped after %d conversation%s%s", count, "" if count == 1 else "s",
                 f" (sessions {', '.join(outcome.session_ids)})" if outcome.session_ids else "")
    else:
        log.info("stopped; session %s", outcome.session_id)


def _already_listening() -> str | None:
    log.info("wake: already listening (R2D2_LISTEN=always)")
    return None
