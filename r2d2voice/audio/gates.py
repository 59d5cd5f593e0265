"""Gates on the microphone path, as pure logic (the caller supplies the time).

:class:`EchoGate` is the half-duplex gate: while the robot's reply plays (and for a short tail
after it) microphone frames are held back so the speaker cannot trigger the service's VAD;
speech clearly louder than the playback leak opens it (barge-in), the held frames first.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from r2d2voice.audio.pcm import rms_dbfs

log = logging.getLogger("r2d2voice.audio.gates")

FRAME_MS = 20


class EchoGate:
    """Holds back microphone frames while the speaker plays, plus ``tail`` seconds after.

    ``barge_in_dbfs``: frames at least this loud (RMS) for ``barge_in_ms`` in a row open the gate
    until the speaker falls quiet, sending the frames held meanwhile (at most ~300 ms of them)
    first; None: nothing opens it while the robot speaks.
    """

    def __init__(self, tail: float = 0.3, barge_in_dbfs: float | None = -25.0,
                 barge_in_ms: int = 120) -> None:
        self.tail = tail
        self.barge_in_dbfs = barge_in_dbfs
        self.need = max(1, barge_in_ms // FRAME_MS)
        self.held: deque[bytes] = deque(maxlen=max(self.need, 15))
        self.loud = 0
        self.open_until_quiet = False
        self.last_playing = float("-inf")

    def reset(self) -> None:
        """Forget held frames and any barge-in in progress (a new connection)."""
        self.held.clear()
        self.loud = 0
        self.open_until_quiet = False

    def playing(self, now: float) -> None:
        """Reply audio is being played (or was just queued for the speaker) at ``now``."""
        self.last_playing = max(self.last_playing, now)

    def filter(self, frame: bytes, now: float, speaker_busy: bool) -> list[bytes]:
        """The frames to send now for microphone ``frame`` (none while it is held back).

        ``speaker_busy``: reply audio is still queued for the speaker at ``now``.
        """
        if speaker_busy:
            self.playing(now)
        if not speaker_busy and now - self.last_playing >= self.tail:
            self.reset()
            return [frame]
        if self.open_until_quiet:
            return [frame]
        if self.barge_in_dbfs is None:
            return []
        self.held.append(frame)
        level = rms_dbfs(np.frombuffer(frame, dtype="<i2"))
        self.loud = self.loud + 1 if level >= self.barge_in_dbfs else 0
        if self.loud < self.need:
            return []
        log.info("barge-in: speech over the robot (%.0f dBFS); opening the mic", level)
        self.open_until_quiet = True
        out = list(self.held)
        self.held.clear()
        return out
