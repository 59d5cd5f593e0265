"""``r2d2voice replay``: a sound file as the microphone, a WAV file as the speaker."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.signals import Interrupted, stopped_by_signal, with_signals
from r2d2voice.audio.pcm import RATE
from r2d2voice.errors import RuntimeFailure, UsageError
from r2d2voice.system.config import Settings

if TYPE_CHECKING:
    from r2d2voice.appliance.compose import Outcome

log = logging.getLogger("r2d2voice.appliance.replay_file")

#: a replay that has never reached its service gives up after trying this long (a robot's
#: ``run`` keeps trying: its network may come later)
GIVE_UP_CONNECTING = 15.0


class TextConsole:
    """Prints ``you: …`` / ``r2: …`` as transcripts arrive, and a progress bar on a terminal."""

    def __init__(self, out: Any = None, err: Any = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = bool(getattr(self.err, "isatty", lambda: False)())
        self._bar = False
        self._stopped = False
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
        if not self.tty or self._stopped:
            return
        width = 30
        filled = int(width * fraction)
        self.err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} ")
        self.err.flush()
        self._bar = True

    def stop(self) -> None:
        """No more progress bar: the run is stopping (log lines follow)."""
        self._stopped = True
        self.finish()

    def finish(self) -> None:
        if self._bar:
            self.err.write("\r" + " " * 40 + "\r")
            self.err.flush()
            self._bar = False


def default_out_path(input_path: Path) -> Path:
    """In the current directory: ``hello.reply.wav`` for ``hello.wav``, and the whole name for
    other formats (``hello.flac.reply.wav``), so hello.flac and hello.mp3 keep their own."""
    name = input_path.name
    if input_path.suffix.lower() == ".wav":
        name = input_path.stem
    return Path.cwd() / f"{name}.reply.wav"


def check_out_path(out: Path, file: Path) -> None:
    """UsageError for an ``--out`` that would overwrite the input or is named as another format
    (replies are always WAV; a device or FIFO such as /dev/null is fine)."""
    if out.exists() and out.resolve() == Path(file).resolve():
        raise UsageError(f"--out {out} would overwrite the input file")
    special = out.exists() and not out.is_file() and not out.is_dir()
    if out.suffix and out.suffix.lower() != ".wav" and not special:
        raise UsageError(f"--out {out}: replies are written as WAV; name the file .wav")


def replay_command(settings: Settings, file: Path, *, out: Path | None, speed: str,
                   timeout: float | None, url: str | None) -> None:
    """Hold a conversation with ``file`` as the microphone, replies to ``out``; print the
    transcripts and a summary. With ``R2D2_LISTEN=wake`` the wake-word detector hears the file
    first, and each wake opens a conversation (none heard: said on stderr, still exit 0). A
    timeout is a RuntimeFailure (exit 1); a signal ends it early, keeping what was said, and is
    :class:`Interrupted` (exit 130 for SIGINT, 143 for SIGTERM).

    The default timeout, 60 s + 3x the file's length, holds in both modes: woken
    conversations never overlap, the file is paced in real time while one is open (its idle
    time is the file's audio), and the end of the file closes the last one.

    With a budget cap (``R2D2_BUDGET_*``), a replay that reaches it sends nothing more and is a
    RuntimeFailure naming the budget once what was said is stored; one started with the budget
    already spent is one before anything is sent."""
    from r2d2voice.appliance.compose import RunOptions, check_listening, hold, link_policy
    from r2d2voice.appliance.sinks import WavSink
    from r2d2voice.appliance.sources import FileSource, VadParams
    from r2d2voice.audio.files import AudioReader

    out = out or default_out_path(file)
    check_out_path(out, file)
    check_listening(settings)
    audio = AudioReader(file)  # checks the file now; decodes block by block while replaying
    console = TextConsole()
    realtime = speed == "realtime"
    vad = VadParams(settings.vad_threshold, settings.vad_prefix_ms, settings.vad_silence_ms)
    source = FileSource(audio, realtime=realtime, vad=vad, progress=console.progress)
    sink = WavSink(str(out), realtime=realtime)
    limit = timeout if timeout is not None else 60.0 + 3 * source.seconds
    stopper = Stopper()
    stopper.on_stop(console.stop)
    metadata = {"command": "replay", "file": str(file), "speed": speed}
    wake = settings.listen == "wake"

    async def main() -> Any:
        async def body() -> Any:
            async with trio.open_nursery() as nursery:

                async def deadline() -> None:
                    await trio.sleep(limit)
                    stopper.stop("timeout")

                nursery.start_soon(deadline)
                outcome = await hold(settings, source, sink, RunOptions(
                    url=url, console=console, stopper=stopper, metadata=metadata,
                    policy=replace(link_policy(settings), give_up_connecting=GIVE_UP_CONNECTING)))
                nursery.cancel_scope.cancel()
            return outcome

        return await with_signals(stopper, body)

    outcome = trio.run(main)
    console.finish()
    budget = outcome.budget
    if budget is not None and budget.stop == "before":  # nothing was sent
        raise RuntimeFailure(budget.state.closed_message())
    reply = f"{sink.samples_written / RATE:.1f} s of reply audio in {out}"
    if sink.kept_existing:
        reply = f"no reply audio ({out} left as it was)"
    if wake:
        print(_woken_summary(outcome, reply))
    else:
        turns = outcome.assistant_turns
        print(f"{turns} turn{'s' if turns != 1 else ''} answered, {reply}, "
              f"{outcome.wall_seconds:.1f} s wall time (session {outcome.session_id})")
    if source.truncated:
        print(f"{file} is truncated or corrupt after {audio.seconds_decoded:.1f} s: "
              "what could be read was played", file=sys.stderr)
    elif wake and not outcome.conversations and stopper.reason is None:
        print(f"no wake word heard in {file} (R2D2_WAKE_WORD={settings.wake_word}): nothing "
              "was sent", file=sys.stderr)
    elif not wake and not source.turns and stopper.reason is None:
        print(f"no speech found in {file}", file=sys.stderr)
    signum = stopped_by_signal(stopper)
    lost = outcome.store
    if lost is not None and lost.lost and signum is None:  # a signal keeps its exit code
        raise RuntimeFailure(
            f"{lost.reason or 'database'}: {lost.transcripts_lost} transcripts ({lost.lost} "
            f"records) could not be written to {settings.db} and are lost")
    if stopper.reason == "timeout":
        raise RuntimeFailure(f"replay timed out after {limit:g} s; what was said is stored")
    if signum is not None:
        raise Interrupted(f"interrupted by {signum.name} before the end of {file}; what was said "
                          "is stored", signum)
    if budget is not None and budget.stop is not None:
        raise RuntimeFailure(budget.state.stopped_message(outcome.assistant_turns))


def _woken_summary(listening: Outcome, reply: str) -> str:
    """``2 conversations (woken at 0.9 s, 25.9 s), 2 turns answered, …``."""
    count, turns = len(listening.conversations), listening.assistant_turns
    woken = ", ".join(f"{c.heard.at_s:.1f} s" for c in listening.conversations)
    ids = listening.session_ids
    sessions = (f"session {ids[0]}" if len(ids) == 1
                else f"sessions {', '.join(ids)}" if ids else "no session")
    return (f"{count} conversation{'s' if count != 1 else ''}"
            f"{f' (woken at {woken})' if woken else ''}, "
            f"{turns} turn{'s' if turns != 1 else ''} answered, {reply}, "
            f"{listening.wall_seconds:.1f} s wall time ({sessions})")
