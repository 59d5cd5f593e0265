"""Where microphone audio comes from: a recording (``replay``) or the microphone (``run``)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import trio

from r2d2voice.audio import portaudio
from r2d2voice.audio.availability import DeviceStates
from r2d2voice.audio.capture import CaptureStatistics, run_capture
from r2d2voice.audio.devices import DeviceInfo
from r2d2voice.audio.echo import EchoCanceller
from r2d2voice.audio.files import AudioReader
from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE, Framer
from r2d2voice.audio.vad import EnergyVad, SpeechStarted, Turn
from r2d2voice.link.turns import Answer, Ticket, TurnGate
from r2d2voice.system.config import default

log = logging.getLogger("r2d2voice.appliance.sources")

#: Extra silence after the service's VAD window, so the last turn surely closes.
TAIL_MARGIN_MS = 700
#: In fast mode, how long to wait for the service to notice a turn before moving on anyway.
NOTICE_TIMEOUT = 3.0
#: In fast mode, frames sent after the VAD closed a turn before waiting for the reply.
CLOSE_MARGIN_FRAMES = 6
#: A turn longer than this is sent again only from its last MAX_HELD_SECONDS after a link drop.
MAX_HELD_SECONDS = 300
MAX_HELD_FRAMES = MAX_HELD_SECONDS * RATE // FRAME_SAMPLES
#: Arrays given to FileSource are fed in blocks of this many samples, like a file's blocks.
BLOCK_SAMPLES = 1 << 16


@dataclass(frozen=True)
class VadParams:
    threshold: float = default("vad_threshold")
    prefix_padding_ms: int = default("vad_prefix_ms")
    silence_duration_ms: int = default("vad_silence_ms")


class FileSource:
    """Streams a recording as 20 ms frames, followed by silence that closes the last turn.

    The recording is an :class:`AudioReader` (decoded, resampled and framed block by block in a
    worker thread: memory stays flat whatever the file's length) or, for tests, an int16 array.
    ``realtime`` paces frames at 20 ms (a person talking, who may talk over the robot). Fast
    mode goes as fast as the conversation allows but never faster: an energy VAD with the
    service's parameters runs on the frames as they are read; when it closes a turn the source
    sends a few more frames and waits until the reply has come, so later audio never interrupts
    an earlier reply. The frames since the previous turn are held (at most
    ``MAX_HELD_SECONDS``) to send the turn again if the link dies during it.
    Channel policy: a full channel makes this source wait (a replay loses nothing).
    """

    live = False
    frames_dropped = 0

    def __init__(self, audio: AudioReader | np.ndarray, *, realtime: bool, vad: VadParams,
                 turn_timeout: float = 60.0,
                 progress: Callable[[float], None] | None = None) -> None:
        self.audio = audio
        self.realtime = realtime
        self.vad = vad
        self.turn_timeout = turn_timeout
        self.progress = progress
        self._tail_samples = RATE * (vad.silence_duration_ms + TAIL_MARGIN_MS) // 1000
        samples = (round(audio.seconds * RATE) if isinstance(audio, AudioReader)
                   else len(audio))
        self._total = -(-(samples + self._tail_samples) // FRAME_SAMPLES)
        #: turns the VAD closed so far (all of them once the run is over)
        self.turns: list[Turn] = []
        self.frames_read = 0

    @property
    def resends(self) -> bool:
        """Fast mode sends a turn again when its link died: queued frames are stale then."""
        return not self.realtime

    @property
    def seconds(self) -> float:
        """Length including the closing silence (from the file's header for a reader)."""
        return self._total * FRAME_SAMPLES / RATE

    def set_urgent(self, urgent: bool) -> None:
        """A file is never batched: nothing to do."""

    @property
    def truncated(self) -> bool:
        """The file ended early (corrupt or cut short): what was decoded was sent."""
        return isinstance(self.audio, AudioReader) and self.audio.truncated

    async def run(self, send: trio.MemorySendChannel[bytes], turns: TurnGate | None) -> None:
        """Owns ``send``. ``turns``: the link's turn-taking (fast mode waits for each reply);
        None: every frame as fast as ``send`` takes them, and whoever reads them paces the
        file (the wake gate's chain, appliance/chain.py)."""
        async with send, _Frames(self) as frames:
            try:
                if self.realtime:
                    await self._realtime(send, frames)
                elif turns is None:
                    await self._stream(send, frames)
                else:
                    await self._fast(send, frames, turns)
            except trio.BrokenResourceError:
                log.debug("uplink closed before the file ended")

    async def _stream(self, send: trio.MemorySendChannel[bytes], frames: _Frames) -> None:
        done = 0
        while (frame := await frames.next()) is not None:
            await send.send(frame)
            done += 1
            self._progress(done)

    async def _realtime(self, send: trio.MemorySendChannel[bytes], frames: _Frames) -> None:
        start = trio.current_time()
        i = 0
        while (frame := await frames.next()) is not None:
            await trio.sleep_until(start + i * FRAME_SAMPLES / RATE)
            await send.send(frame)
            i += 1
            self._progress(i)

    async def _fast(self, send: trio.MemorySendChannel[bytes], frames: _Frames,
                    turns: TurnGate) -> None:
        sent = 0
        while not frames.exhausted:
            # this turn's frames, to send again if the link dies (bounded: drop-oldest)
            held: deque[bytes] = deque(maxlen=MAX_HELD_FRAMES)
            closed: Turn | None = None
            margin = CLOSE_MARGIN_FRAMES
            for _attempt in range(3):
                # never start talking while the robot is busy or the link is down
                ticket = await turns.next_turn()
                if ticket is None:
                    return  # stopping
                if await self._resend(send, held, turns, ticket):
                    while margin > 0 and turns.still(ticket):
                        frame = await frames.next()
                        if frame is None:
                            break
                        held.append(frame)
                        await _send(send, frame)
                        sent += 1
                        self._progress(sent)
                        if closed is None:
                            closed = frames.closed_turn()
                        if closed is not None:
                            margin -= 1
                    if turns.still(ticket):
                        if closed is None:
                            return  # the file ended with no further turn
                        answer = await turns.answered(ticket, NOTICE_TIMEOUT, self.turn_timeout)
                        if answer is Answer.NOT_HEARD:
                            log.info("the service did not hear the turn ending at %.1f s; "
                                     "going on", closed.end_sample / RATE)
                        elif answer is Answer.NO_REPLY:
                            log.warning("no reply within %.0f s to the turn ending at %.1f s; "
                                        "going on", self.turn_timeout, closed.end_sample / RATE)
                        if answer is not Answer.MOVED:
                            break
                # the link died during this turn: send the whole turn again
                log.info("link changed during the turn ending at %.1f s: sending it again",
                         (closed.end_sample if closed else frames.read_samples) / RATE)

    async def _resend(self, send: trio.MemorySendChannel[bytes], held: deque[bytes],
                      turns: TurnGate, ticket: Ticket) -> bool:
        """Send the held frames again; False if the link changed meanwhile."""
        for frame in held:
            if not turns.still(ticket):
                return False
            await _send(send, frame)
        return turns.still(ticket)

    def _progress(self, done: int) -> None:
        if self.progress and (done >= self._total or done % 25 == 0):
            self.progress(min(1.0, done / self._total))


class _Frames:
    """The recording as 20 ms frames, read ahead one decoded block at a time (in a worker
    thread for a file), with the closing silence appended and a VAD watching them go by."""

    def __init__(self, source: FileSource) -> None:
        self.source = source
        vad = source.vad
        self._vad = EnergyVad(RATE, threshold=vad.threshold,
                              prefix_padding_ms=vad.prefix_padding_ms,
                              silence_duration_ms=vad.silence_duration_ms)
        self._framer = Framer()
        self._queue: deque[bytes] = deque()
        self._blocks: Iterator[np.ndarray] | None = None
        self._onset: int | None = None
        self._scanned: list[Turn] = []  # found ahead of the frames handed out
        self._closed: list[Turn] = []
        self.read_samples = 0
        self.exhausted = False
        self._tail_done = False

    async def __aenter__(self) -> _Frames:
        audio = self.source.audio
        if isinstance(audio, AudioReader):
            self._blocks = audio.blocks()
        else:
            arr = np.asarray(audio, dtype=np.int16)
            self._blocks = iter([arr[i:i + BLOCK_SAMPLES]
                                 for i in range(0, len(arr), BLOCK_SAMPLES)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()  # closes the sound file if the run ended early

    def closed_turn(self) -> Turn | None:
        """A turn the VAD closed in the frames handed out so far (oldest first), or None."""
        return self._closed.pop(0) if self._closed else None

    async def next(self) -> bytes | None:
        """The next frame, or None at the end (after the closing silence)."""
        while not self._queue:
            if self._tail_done:
                self.exhausted = True
                return None
            block = await self._read_block()
            if block is None:
                block = np.zeros(self.source._tail_samples, np.int16)
                self._tail_done = True
            self._scan(block)
            self._queue.extend(self._framer.push(block))
            if self._tail_done and (last := self._framer.flush()) is not None:
                self._queue.append(last)
        frame = self._queue.popleft()
        self.read_samples += FRAME_SAMPLES
        self.source.frames_read += 1
        # a turn counts as closed once the frame holding its close point is handed out
        while self._scanned and self._scanned[0].close_sample <= self.read_samples:
            turn = self._scanned.pop(0)
            self._closed.append(turn)
            self.source.turns.append(turn)
        return frame

    async def _read_block(self) -> np.ndarray | None:
        assert self._blocks is not None
        if isinstance(self.source.audio, AudioReader):
            return await trio.to_thread.run_sync(next, self._blocks, None)
        return next(self._blocks, None)

    def _scan(self, block: np.ndarray) -> None:
        """Run the VAD over a block as it is read (one numpy pass per block, not per frame)."""
        for event in self._vad.feed(block):
            if isinstance(event, SpeechStarted):
                self._onset = event.onset_ms * RATE // 1000
            else:
                end = event.audio_end_ms * RATE // 1000
                close = end + self._vad.silence_duration_ms * RATE // 1000
                self._scanned.append(Turn(self._onset or 0, end, close))
                self._onset = None


async def _send(send: trio.MemorySendChannel[bytes], frame: bytes) -> None:
    """Fill the channel without yielding per frame; wait only when it is full (the uplink then
    sends what is queued in one append). The wait for each reply gives the other tasks a turn."""
    try:
        send.send_nowait(frame)
    except trio.WouldBlock:
        await send.send(frame)


class DeviceSource:
    """Live capture from the microphone a setting names (or a device already found).

    Channel policy: never blocks; a full uplink queue drops the newest frame and counts it
    (see ``capture.run_capture``). A missing, vanished or silent microphone is waited for and
    reopened; the audio of the gap is lost. Audio is handed over in 100 ms batches while the
    conversation is idle and nothing plays, frame by frame otherwise (barge-in and the end of a
    turn keep their latency).
    """

    live = True
    resends = False

    def __init__(self, device: str | int | DeviceInfo | None, *,
                 latency: float | str | None = None,
                 states: DeviceStates | None = None,
                 echo: EchoCanceller | None = None) -> None:
        self.device = device
        self.latency = latency
        self.states = states
        #: the echo canceller the microphone's audio goes through (None: none)
        self.echo = echo
        self.stats = CaptureStatistics()
        #: set once capture runs, or once it deliberately waits for the microphone
        self.running = trio.Event()
        self._started_at = 0.0
        self._capture: list = []

    async def run(self, send: trio.MemorySendChannel[bytes], turns: TurnGate | None) -> None:
        """Owns ``send``; a person never waits for turns (``turns`` is not used)."""
        async with trio.open_nursery() as nursery:

            async def capture(task_status: trio.TaskStatus[None]) -> None:
                await run_capture(send, self.device, latency=self.latency, stats=self.stats,
                                  states=self.states, capture=self._capture, echo=self.echo,
                                  task_status=task_status)
                nursery.cancel_scope.cancel()  # the receiver is gone: stop following too

            await nursery.start(capture)
            self._started_at = trio.current_time()
            self.running.set()
    def set_urgent(self, urgent: bool) -> None:
        """Hand the microphone's audio over block by block (True: a turn is open, a reply
        plays, a woken conversation is on) or in 100 ms batches (the run says which)."""
        for capture in self._capture:
            capture.set_urgent(urgent)

    @property
    def frames_dropped(self) -> int:
        """Frames dropped because the uplink queue was full (e.g. while reconnecting)."""
        return self.stats.frames_dropped

    def healthy(self, within: float = 5.0) -> bool:
        """Capture made progress in the last ``within`` seconds: frames arrived, or the loop
        that waits for a missing microphone (or reopens a silent one) looked for it. A run that
        is deliberately waiting is healthy; one stuck is not: a PortAudio call that has not
        returned for ``within`` seconds (the speaker's too), a capture loop that stopped
        (a wedged event loop stops the checks themselves).

        A stream that started less than ``within`` seconds ago and has not delivered its first
        frame yet counts as healthy: a check falling between start and first frame must not
        withhold a ping (one missed ping is a gap of a whole ``WatchdogSec``).
        """
        if portaudio.stuck(within):
            return False
        if not self.running.is_set():
            return True
        stamps = [t for t in (self.stats.last_frame_time, self.stats.last_progress,
                              self._started_at) if t is not None]
        return trio.current_time() - max(stamps) < within
