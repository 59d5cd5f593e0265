"""A synchronous stand-in for the local backend's shell, for sans-IO tests of LocalSession.

:class:`Peer` streams a reply only when told, so a test decides what the client has heard when
it speaks again; late events (:class:`Later`) wait for :meth:`Peer.flush_later`; ids come from
a counter, and every event is checked against the openai SDK's schema.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter
from support import RATE, silence, tone

from r2d2voice.localbackend.outputs import Tick
from r2d2voice.localbackend.reply import Reply, leftover_audio, synthesize
from r2d2voice.localbackend.session import CancelReply, Later, LocalSession
from r2d2voice.localbackend.wire import CountingIds

SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
NOW = 1_750_000_000.0
CHUNK_MS = 100
CHUNK = RATE * CHUNK_MS // 1000  # samples per delta
FRAME = 480  # 20 ms per append
Json = dict[str, Any]


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")


def pcm_of(events: list[Json]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events
                    if e["type"] == "response.output_audio.delta")


def types(events: list[Json]) -> list[str]:
    return [e["type"] for e in events]


def first(events: list[Json], type_: str) -> Json:
    return next(e for e in events if e["type"] == type_)


def turn_audio(speech_s: float = 1.0, freq: float = 440.0) -> np.ndarray:
    """0.5 s silence, a tone burst, 1 s silence: one server-VAD turn."""
    return np.concatenate([silence(0.5), tone(speech_s, freq=freq), silence(1.0)])


class Peer:
    """A :class:`LocalSession` with a synchronous stand-in for its shell."""

    def __init__(self, reply_seconds: float = 1.0, **kwargs: Any) -> None:
        self.session = LocalSession("gpt-realtime-2.1", clock=lambda: NOW, new_id=CountingIds(),
                                    reply_seconds=reply_seconds, **kwargs)
        self.events: list[Json] = []
        self.queue: list[tuple[Reply, Iterator[Json | Tick]]] = []  # replies to stream
        self.later: list[Later] = []
        self._emit([self.session.created()])

    def _emit(self, events: list[Json]) -> None:
        for event in events:
            SERVER_EVENT.validate_python(event)
            self.events.append(event)

    def _act(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                self.queue.append((action, self._steps(action)))
            elif isinstance(action, CancelReply):
                steps = next(s for r, s in self.queue if r is action.reply)
                self.queue = [(r, s) for r, s in self.queue if r is not action.reply]
                self._emit(leftover_audio(steps, self.session.faults.leftover_audio_deltas))
                self._close(action.reply)
            elif isinstance(action, Later):
                self.later.append(action)
            else:
                self._emit([action])

    def raw(self, message: str | bytes) -> list[Json]:
        """One websocket frame in; the events it produced out (a cancel closes the reply)."""
        start = len(self.events)
        self._act(self.session.receive(message))
        return self.events[start:]

    def send(self, type_: str, **body: Any) -> list[Json]:
        return self.raw(json.dumps({"type": type_, **body}))

    def append(self, pcm: np.ndarray) -> list[Json]:
        start = len(self.events)
        for i in range(0, len(pcm), FRAME):
            self.send("input_audio_buffer.append", audio=b64(pcm[i : i + FRAME]))
        return self.events[start:]

    def idle(self) -> list[Json]:
        """The shell's idle timer fired."""
        start = len(self.events)
        self._act(self.session.on_idle())
        return self.events[start:]

    def flush_later(self) -> list[Json]:
        """The late events' timers fired."""
        start = len(self.events)
        for later in self.later:
            self._emit(later.events)
        self.later = []
        return self.events[start:]

    def stream(self, chunks: int | None = None) -> list[Json]:
        """Stream the oldest queued reply: its events up to audio chunk ``chunks`` (None: all
        of it, then its closing events)."""
        start = len(self.events)
        reply, steps = self.queue[0]
        ticks = 0
        for step in steps:
            if isinstance(step, Tick):
                if ticks == chunks:
                    break
                ticks += 1
                continue
            self._emit([step])
            reply.sent(step)
        else:
            self.queue.pop(0)
            self._close(reply)
        return self.events[start:]

    @staticmethod
    def _steps(reply: Reply) -> Iterator[Json | Tick]:
        yield from reply.opening()
        beeps = synthesize(reply.seed, reply.seconds) if reply.speaks else None
        yield from reply.steps(beeps, CHUNK_MS)

    def _close(self, reply: Reply) -> None:
        self.session.finish_reply(reply)
        self._emit(reply.closing())
