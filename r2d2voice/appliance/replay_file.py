"""``r2d2voice replay``: a sound file as the microphone, a WAV file as the speaker."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.signals import with_signals
from r2d2voice.audio.pcm import RATE
from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.system.config import Settings

log = logging.getLogger("r2d2voice.appliance.replay_file")


class TextConsole:
    """Prints ``you: …`` / ``r2: …`` as transcripts arrive, and a progress bar on a terminal."""

    def __init__(self, out: Any = None, err: Any = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = bool(getattr(self.err, "isatty", lambda: False)())
        self._bar = False
        self._status = ""

    def transcript(self, role: str, text: str) -> None:
        self.finish()
        who = "you" if role == "user" else "r2"
        print(f"{who}: {text}", file=self.out, flush=True)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            log.debug("status: %s", text)

    def progress(self, fraction: float) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * fraction)
        self.err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} ")
        self.err.flush()
        self._bar = True

    def finish(self) -> None:
        if self._bar:
            self.err.write("\r" + " " * 40 + "\r")
            self.err.flush()
            self._bar = False


def default_out_path(input_path: Path) -> Path:
    """``<stem>.reply.wav`` in the current directory."""
    return Path.cwd() / f"{input_path.stem}.reply.wav"


def replay_command(settings: Settings, file: Path, *, out: Path | None, speed: str,
                   timeout: float | None, url: str | None) -> None:
    """Hold a conversation with ``file`` as the microphone, replies to ``out``; print the
    transcripts and a summary. A timeout is a RuntimeFailure (exit 1); a signal ends it early,
    keeping what was said."""
    from r2d2voice.appliance.compose import converse
    from r2d2voice.appliance.sinks import WavSink
    from r2d2voice.appliance.sources import FileSource, VadParams
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
