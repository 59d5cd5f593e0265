"""The simulated room as a process on the PulseAudio rig: what the speaker plays comes back
into the microphone as echo, with the room's fan.

    PULSE_SOURCE=speaker.monitor PULSE_SINK=mic python tests/room_process.py GAIN

One duplex PortAudio stream on ALSA's ``pulse`` device (so the room adds only a few tens of
milliseconds of its own to the echo's delay): each 10 ms block of what the speaker played
becomes its echo (``room.EchoPath``: soft clipping, 1.5 ms direct path, reflections, 0.3 s
tail, scaled by ``GAIN``) plus fan noise at -55 dBFS, played into the microphone. Prints
``ready`` once the stream runs; stops on SIGTERM. A person is played into the ``mic`` sink by
the test itself, next to this (PulseAudio mixes them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import sounddevice as sd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from room import EchoPath, fan_noise

RATE = 48000
BLOCK = RATE // 100
#: the stream's latency: enough that a busy machine does not starve it (a gap in the room's
#: output would move the echo in time, which no real room does)
LATENCY = 0.03


def main() -> None:
    gain = float(sys.argv[1])
    with contextlib.suppress(OSError):
        os.nice(-10)  # the room must keep time on a busy machine (as root; else as it is)
    path = EchoPath(RATE, gain, BLOCK)
    noise = fan_noise(10.0, RATE).astype(np.float32)  # ten seconds of fan, looped
    at = 0

    def callback(indata: np.ndarray, outdata: np.ndarray, frames: int, time: object,
                 status: object) -> None:
        nonlocal at
        fan = noise[at:at + frames]
        at = (at + frames) % (len(noise) - BLOCK)
        outdata[:, 0] = np.clip(path.process(indata[:, 0]) + fan, -1, 1)

    with sd.Stream(device="pulse", samplerate=RATE, blocksize=BLOCK, channels=1,
                   dtype="float32", latency=LATENCY, callback=callback):
        print("ready", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
