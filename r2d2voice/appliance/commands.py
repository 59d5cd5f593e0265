"""Bodies of the long-running commands: each is one ``trio.run``."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from r2d2voice.appliance.pipeline import Stopper
from r2d2voice.audio.pcm import RATE
from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.system.config import Settings

log = logging.getLogger("r2d2voice")
T = TypeVar("T")


async def with_signals(stopper: Stopper, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body``; the first SIGINT/SIGTERM stops it gracefully, a second one hard."""
    result: list[T] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if stopper.reason is None:
                        log.info("%s: finishing up", signal.Signals(signum).name)
                        stopper.stop("signal")
                    else:
                        nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        result.append(await body())
        nursery.cancel_scope.cancel()
    if not result:
        raise RuntimeFailure("stopped by a second signal")
    return result[0]


def replay_command(settings: Settings, file: Path, *, out: Path | None, speed: str,
                   timeout: float | None, url: str | None) -> None:
    """``r2d2voice replay``: the WAV file as microphone, a WAV file as speaker."""
    from r2d2voice.appliance.compose import TextConsole, converse, default_out_path
    from r2d2voice.appliance.replay import FileSource, VadParams, WavSink
    from r2d2voice.audio.files import load_audio

    pcm = load_audio(file)
    out = out or default_out_path(file)
    if out.resolve() == Path(file).resolve():
        raise UsageError(f"--out {out} would overwrite the input file")
    console = TextConsole()
    realtime = speed == "realtime"
    vad = VadParams(settings.vad_threshold, settings.vad_prefix_ms, settings.vad_silence_ms)
    source = FileSource(pcm, realtime=realtime, vad=vad, progress=console.progress)
    sink = WavSink(str(out), realtime=realtime)
    limit = timeout if timeout is not None else 60.0 + 3 * source.seconds
    stopper = Stopper()

    async def main() -> Any:
        async def body() -> Any:
            async with trio.open_nursery() as nursery:

                async def deadline() -> None:
                    await trio.sleep(limit)
                    stopper.stop("timeout")

                nursery.start_soon(deadline)
                outcome = await converse(settings, source, sink, url=url, console=console,
                                         stopper=stopper,
                                         metadata={"command": "replay", "file": str(file),
                                                   "speed": speed})
                nursery.cancel_scope.cancel()
            return outcome

        return await with_signals(stopper, body)

    outcome = trio.run(main)
    console.finish()
    stats = outcome.ctx.stats if outcome.ctx else None
    turns = stats.assistant_turns if stats else 0
    reply_s = sink.samples_written / RATE
    print(f"{turns} turn{'s' if turns != 1 else ''} answered, {reply_s:.1f} s of reply audio "
          f"in {out}, {outcome.wall_seconds:.1f} s wall time (session {outcome.session_id})")
    if stopper.reason == "timeout":
        raise RuntimeFailure(f"replay timed out after {limit:g} s; what was said is stored")
    if stopper.reason == "signal":
        print("stopped by a signal before the end of the file; what was said is stored")


def serve_local_command(host: str, port: int) -> None:
    """``r2d2voice serve-local``: the local backend until SIGINT/SIGTERM."""
    from r2d2voice.localbackend.server import BackendConfig, serve_local

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(serve_local, host, port, BackendConfig())
            except OSError as exc:
                raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            print(f"local Realtime backend on ws://{host}:{bound}/v1/realtime", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)


class ServiceConsole:
    """Console for ``run``: transcripts and status go to the log (the journal under systemd),
    status also to systemd's STATUS=."""

    def __init__(self, notifier: object) -> None:
        self.notifier = notifier
        self.last = ""

    def transcript(self, role: str, text: str) -> None:
        log.info("%s: %s", "you" if role == "user" else "r2", text)

    def status(self, text: str) -> None:
        if text != self.last:
            self.last = text
            log.debug("status: %s", text)
            self.notifier.status(text)  # type: ignore[attr-defined]


def run_command(settings: Settings, *, url: str | None) -> None:
    """``r2d2voice run``: microphone and speaker until SIGTERM/SIGINT, under systemd or not."""
    from r2d2voice.appliance.compose import converse
    from r2d2voice.appliance.live import DeviceSink, DeviceSource
    from r2d2voice.audio.devices import resolve_device
    from r2d2voice.system.notify import Notifier, run_watchdog, watchdog_interval

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
    log.info("stopped; session %s", outcome.session_id)
