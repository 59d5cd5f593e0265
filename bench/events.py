"""The event hub's cost per event (``system/events.py``), against a floor measured in the same
run: a bare ``trio`` memory channel ``send_nowait`` of a ready-made line (what delivering a
moment to one follower cannot go below).

Cases, each ``--events`` emits in a loop on trio's thread (CPU time: ``time.process_time``):

- ``nobody``: no follower at all (what the link pays when nothing follows the run);
- ``level, unwanted``: a ``level`` while four followers take everything but level (the
  speaker's thread pays only this until someone asks for levels; the meter itself does not
  even measure then);
- ``1 follower`` / ``4 followers``: ``spoken`` (three fields) to one / four queues: the stamp,
  the JSON line (once, whoever many follow), a ``send_nowait`` each; the queues are drained
  between batches, so nothing is dropped;
- ``from a thread``: ``level`` emitted from another thread (the PortAudio callback's path:
  ``run_sync_soon``) to one follower, until all are delivered.

Then the speaker's level meter (``audio/level.py``) on 10 ms blocks, as the output callback
hands them out, as a share of one core per second of audio.

    .venv/bin/python bench/events.py               # ~10 s
    .venv/bin/python bench/events.py --events 200000
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import trio

from r2d2voice.audio.level import LevelMeter
from r2d2voice.audio.pcm import RATE
from r2d2voice.system.events import Events

BATCH = 1000


def cpu_per_call(run: Callable[[], None], calls: int, repeats: int) -> float:
    """Median CPU seconds per call of ``run`` (which makes ``calls`` calls)."""
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        samples.append((time.process_time() - start) / calls)
    return statistics.median(samples)


async def measure(events: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    batches = max(1, events // BATCH)

    send, receive = trio.open_memory_channel[str](BATCH)
    line = '{"event": "spoken", "item_id": "item_1", "interrupted": false, "played_ms": 1200}'

    def floor() -> None:
        for _ in range(batches):
            for _ in range(BATCH):
                send.send_nowait(line)
            while True:
                try:
                    receive.receive_nowait()
                except trio.WouldBlock:
                    break

    out["floor: send_nowait"] = cpu_per_call(floor, batches * BATCH, repeats)

    def emitting(hub: Events, subs: list, name: str, **fields: object) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batches):
                for _ in range(BATCH):
                    hub.emit(name, **fields)
                for sub in subs:
                    while True:
                        try:
                            sub.receive.receive_nowait()
                        except trio.WouldBlock:
                            break
        return run

    spoken = {"item_id": "item_1", "interrupted": False, "played_ms": 1200}
    hub = Events()
    out["nobody"] = cpu_per_call(emitting(hub, [], "spoken", **spoken), batches * BATCH,
                                 repeats)
    for count in (1, 4):
        hub = Events()
        subs = [hub.subscribe(bound=BATCH) for _ in range(count)]
        label = f"{count} follower{'s' if count > 1 else ''}"
        out[label] = cpu_per_call(emitting(hub, subs, "spoken", **spoken), batches * BATCH,
                                  repeats)
        if count == 4:
            out["level, unwanted"] = cpu_per_call(emitting(hub, subs, "level", rms=0.25),
                                                  batches * BATCH, repeats)
        for sub in subs:
            hub.unsubscribe(sub)

    hub = Events()
    sub = hub.subscribe(level=True, bound=events + 1)
    samples = []
    for _ in range(repeats):
        def audio_thread() -> None:
            for _ in range(events):
                hub.emit("level", rms=0.25)

        start = time.process_time()
        thread = threading.Thread(target=audio_thread)
        thread.start()
        got = 0
        while got < events:
            await sub.receive.receive()
            got += 1
        thread.join()
        samples.append((time.process_time() - start) / events)
    out["from a thread"] = statistics.median(samples)
    return out


def meter_share(seconds: int) -> float:
    """CPU seconds the level meter takes per second of audio (10 ms blocks)."""
    t = np.arange(seconds * RATE) / RATE
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    meter = LevelMeter(lambda rms: None)
    blocks = [tone[i:i + 240] for i in range(0, len(tone), 240)]
    start = time.process_time()
    for block in blocks:
        meter.feed(block)
    return (time.process_time() - start) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures = trio.run(measure, args.events, args.repeats)
    floor = figures["floor: send_nowait"]
    print(f"the event hub, {args.events} events per case, median of {args.repeats}:")
    print(f"  {'case':<22} {'µs/event':>9} {'× floor':>8}")
    for case, seconds in figures.items():
        print(f"  {case:<22} {seconds * 1e6:9.2f} {seconds / floor:8.1f}")
    share = meter_share(60)
    print(f"the level meter: {share * 100:.3f} % of one core per second of audio "
          f"({share * 1e6 / 100:.1f} µs per 10 ms block)")


if __name__ == "__main__":
    main()
