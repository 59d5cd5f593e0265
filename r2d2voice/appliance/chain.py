"""The microphone chain, one for every way of listening: capture (or a file) → the half-duplex
echo gate → the session gate (wake word, dormant VAD) → the uplink channel.

Channel policy towards the uplink: a live microphone never waits (a full channel drops the
frame and counts it in ``dropped``); a file waits (a replay loses nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from r2d2voice.audio.gates import EchoGate
from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE

log = logging.getLogger("r2d2voice.appliance.chain")

FRAME_S = FRAME_SAMPLES / RATE


class Router(Protocol):
    """The session gate as the chain sees it."""

    @property
    def conversing(self) -> bool: ...

    def route(self, frame: bytes, passed: list[bytes], index: int) -> list[bytes]:
        """What goes to the link now, of ``passed`` (what the echo gate let through of
        ``frame``, the ``index``-th frame of the input)."""

    def input_ended(self) -> None: ...


class MicChain:
    """Runs the chain until the input ends; counts what it held back (``gated``: frames the echo
    gate kept from the service) and dropped (``dropped``: a full uplink, live only)."""

    def __init__(self, gate: Router, *, live: bool, echo: EchoGate | None = None,
                 speaker_busy: Callable[[], bool] = lambda: False,
                 urgent: Callable[[], None] | None = None,
                 pace: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.gate = gate
        self.live = live
        self.echo = echo
        self.speaker_busy = speaker_busy
        self.urgent = urgent
        self.pace = pace
        self.gated = 0
        self.dropped = 0

    async def run(self, frames: trio.MemoryReceiveChannel[bytes],
                  uplink: trio.MemorySendChannel[bytes]) -> None:
        """Owns both ends."""
        try:
            async with frames, uplink:
                index = 0
                async for frame in frames:
                    if self.pace is not None:
                        await self.pace(index)
                    passed = [frame]
                    if self.echo is not None:
                        passed = self.echo.filter(frame, trio.current_time(),
                                                  self.speaker_busy())
                        if not passed:
                            self.gated += 1
                    out = self.gate.route(frame, passed, index)
                    index += 1
                    if self.urgent is not None:
                        self.urgent()  # a wake (or its end) changes how audio is handed over
                    for kept in out:
                        await self._send(uplink, kept)
        except trio.BrokenResourceError:
            log.debug("the link is gone: the microphone chain stops")
        finally:
            self.gate.input_ended()

    async def _send(self, uplink: trio.MemorySendChannel[bytes], frame: bytes) -> None:
        try:
            uplink.send_nowait(frame)
        except trio.WouldBlock:
            if self.live:
                self.dropped += 1
            else:
                await uplink.send(frame)


class FilePacer:
    """A file heard through the wake gate in fast mode: as fast as the detector goes while
    waiting, at 20 ms a frame from a wake until its conversation is over, so fast and realtime
    replays give the same conversations (the detector and the idle time count audio)."""

    def __init__(self, gate: Router) -> None:
        self.gate = gate
        self._from: tuple[int, float] | None = None

    async def __call__(self, index: int) -> None:
        if not self.gate.conversing:
            self._from = None
            return
        if self._from is None:  # the frame after the wake comes 20 ms after it
            self._from = (index, trio.current_time() + FRAME_S)
        first, at = self._from
        await trio.sleep_until(at + (index - first) * FRAME_S)
