"""The parts of one wake-word conversation (see listening.py): the frames the router hands it
(:class:`FrameQueue`), the source that sends them to the link and decides when the
conversation is over (:class:`ConversationFeed`), and the port to the run's speaker
(:class:`SinkPort`)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from r2d2voice.appliance.context import Context
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

log = logging.getLogger("r2d2voice.appliance.listening")

#: Why a conversation ended: quiet for the idle time; the connection ended by itself (the
#: robot hung up after ``end_conversation``, or the link was lost); no service took what was
#: heard within the idle time; the input ended; a stop.
IDLE, ENDED, NO_SERVICE = "idle", "ended", "no service"
END_OF_INPUT, STOPPED = "end of input", "stopped"
#: at most this much audio is held for a conversation while it connects (drop-oldest); a
#: service that has not taken it within as long is given up on
PREROLL_SECONDS = 10.0


class FrameQueue:
    """Microphone frames from the router to one conversation, first the pre-roll (the frames
    since the wake, held while connecting), then live ones.

    Policy when full (``max_frames``): drop the OLDEST frame and count it in ``dropped``;
    :meth:`put` never blocks (the router never waits on the link).
    """

    def __init__(self, max_frames: int) -> None:
        self._frames: deque[bytes] = deque(maxlen=max_frames)
        self._arrived = trio.Event()
        self.dropped = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> None:
        if self.closed:
            return
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(frame)
        self._arrived.set()

    def close(self) -> None:
        """No more frames: :meth:`get` returns None once the queued ones are taken."""
        self.closed = True
        self._arrived.set()

    async def get(self) -> bytes | None:
        """The oldest frame, waiting for one; None once closed and empty."""
        while not self._frames:
            if self.closed:
                return None
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self._frames.popleft()


class ConversationFeed:
    """The source of one conversation: sends the queued frames once the service is connected
    and the chirp has played, and ends the conversation (closes its channel) after ``idle_s``
    with no user speech, no reply and nothing playing (event-driven: the run's watch). The
    countdown starts once the pre-roll is sent (connecting does not count; if that takes
    :data:`PREROLL_SECONDS`, it gives up). When the connection ends by itself, or the queue
    closes, it ends too. ``on_end(reason, ctx)`` is called once, at once (before the link can
    start another connection), whatever ended it (a stop too).

    Channel policy: waits when the uplink channel is full (the queue behind it holds 10 s).
    """

    resends = False

    def __init__(self, queue: FrameQueue, *, live: bool, idle_s: float,
                 on_end: Callable[[str, Context], None]) -> None:
        self.queue = queue
        self.live = live
        self.idle_s = idle_s
        self.on_end = on_end
        self.reason: str | None = None
        self.frames_sent = 0
        #: connected, and the pre-roll handed to the uplink
        self.flushed = trio.Event()

    @property
    def frames_dropped(self) -> int:
        return self.queue.dropped

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Context) -> None:
        try:
            async with send, trio.open_nursery() as nursery:

                def end(reason: str) -> None:
                    if self.reason is None:
                        self.reason = reason
                        self.on_end(reason, ctx)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._forward, send, ctx, end)
                nursery.start_soon(self._idle, ctx, end)
                nursery.start_soon(self._link_ended, ctx, end)
        finally:
            if self.reason is None:
                self.reason = STOPPED
                self.on_end(STOPPED, ctx)

    async def _forward(self, send: trio.MemorySendChannel[bytes], ctx: Context,
                       end: Callable[[str], None]) -> None:
        # the first frames wait for the service, and for the chirp to be over (the half-duplex
        # gate would hold back frames sent while it plays)
        await ctx.watch.wait_for(lambda: ctx.connected and ctx.buffer.queued_samples() == 0)
        while True:
            if not len(self.queue):
                self.flushed.set()
            frame = await self.queue.get()
            if frame is None:
                break
            try:
                await send.send(frame)
            except trio.BrokenResourceError:  # the link is over
                end(ENDED)
                return
            self.frames_sent += 1
        end(END_OF_INPUT)

    async def _idle(self, ctx: Context, end: Callable[[str], None]) -> None:
        def quiet() -> bool:
            return ctx.conversation.settled and ctx.buffer.queued_samples() == 0

        with trio.move_on_after(PREROLL_SECONDS) as connecting:
            await self.flushed.wait()
        if connecting.cancelled_caught:
            log.warning("the service took nothing within %.0f s of the wake: giving up",
                        PREROLL_SECONDS)
            end(NO_SERVICE)
            return
        while True:
            await ctx.watch.wait_for(quiet)
            with trio.move_on_after(self.idle_s) as still:
                await ctx.watch.wait_for(lambda: not quiet())
            if still.cancelled_caught:
                end(IDLE)
                return

    async def _link_ended(self, ctx: Context, end: Callable[[str], None]) -> None:
        await ctx.watch.wait_for(lambda: ctx.connected)
        await ctx.watch.wait_for(lambda: not ctx.connected)
        end(ENDED)


class SinkPort:
    """One conversation's sink: hands reply chunks on to the run's sink, which lives for the
    whole run (one playout buffer, one WAV file). Waits when that channel is full (the sink only
    queues chunks in the playout buffer); once the run's sink is gone (a stop) chunks are
    dropped and counted."""

    def __init__(self, out: trio.MemorySendChannel[AudioChunk]) -> None:
        self.out = out
        self.dropped = 0

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        async with receive:
            async for chunk in receive:
                try:
                    await self.out.send(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.dropped += 1
