"""No session while nobody talks: after the robot hung up, live frames go through a local
energy VAD (the session's own parameters) until someone speaks again."""

from __future__ import annotations

from collections import deque

import numpy as np
import trio

from r2d2voice.audio.pcm import FRAME_SAMPLES, RATE
from r2d2voice.audio.vad import EnergyVad, SpeechStarted
from r2d2voice.link.connection import FrameFeed

#: audio kept from before the onset, beyond the prefix padding (the VAD needs ~60 ms to decide)
PREROLL_MARGIN_MS = 200


async def wait_for_speech(feed: FrameFeed, *, threshold: float, prefix_ms: int,
                          silence_ms: int) -> bool:
    """Take frames until speech starts; the speech so far (with the prefix padding before it)
    is left in ``feed.preroll`` for the next session. False if the source ended first."""
    vad = EnergyVad(RATE, threshold=threshold, prefix_padding_ms=prefix_ms,
                    silence_duration_ms=silence_ms)
    kept: deque[bytes] = deque(maxlen=max(1, (prefix_ms + PREROLL_MARGIN_MS) * RATE
                                          // 1000 // FRAME_SAMPLES))
    feed.carry = None
    while True:
        try:
            frame = await feed.frames.receive()
        except trio.EndOfChannel:
            feed.done = True
            return False
        kept.append(frame)
        if any(isinstance(e, SpeechStarted) for e in vad.feed(np.frombuffer(frame, "<i2"))):
            feed.preroll = list(kept)
            return True
