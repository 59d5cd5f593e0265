"""A small scripted Realtime service on the in-memory transport, for link tests on a MockClock.

It hears turns in the appended audio with the same energy VAD as the local backend, answers
each with ``reply_seconds`` of tone streamed in 100 ms deltas (at ``realtime_factor``), cancels
a reply the user talks over, and misbehaves on request (``Script``). Every client event it
received is kept in ``events`` as (connection index, event).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import trio
from memory_transport import MemoryTransport, memory_pair

from r2d2voice.appliance.sources import FileSource, VadParams
from r2d2voice.audio.vad import EnergyVad
from r2d2voice.audio.vad import SpeechStarted as VadStarted
from r2d2voice.errors import RuntimeFailure
from r2d2voice.link.transport import Endpoint, LinkClosed, Transport

RATE = 24000
CHUNK = RATE // 10  # 100 ms


@dataclass(frozen=True)
class Script:
    reply_seconds: float = 1.0
    realtime_factor: float = 1.0
    #: wait this long before each reply starts
    reply_delay: float = 0.0
    #: after this many response.done on a connection, misbehave in the way ``drop`` says
    drop_after: int | None = None
    drop: Literal["abort", "close", "expire", "silent"] = "close"
    #: connections (0-based) that misbehave (None: every one)
    drop_on: tuple[int, ...] | None = None
    #: refuse this many connection attempts before accepting (RuntimeFailure)
    refuse_first: int = 0
    #: answer session.created with a fatal error of this code
    fatal_code: str | None = None
    #: close every connection with this code right after session.created (no error event)
    close_on_connect: int | None = None
    #: send a benign error (response_cancel_not_active) before each reply
    benign: bool = False
    #: send junk (unknown type, non-JSON, binary, a non-fatal error) before each reply
    junk: bool = False
    #: the user transcript comes this long after the commit (may be after the reply)
    transcript_delay: float = 0.0
    #: transcription fails instead
    transcription_fails: bool = False
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 10,
                                                           "output_tokens": 20})


class FakeService:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.attempts = 0
        self.connections = 0
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.times: list[float] = []  # when each of ``events`` arrived
        self.sent: list[tuple[int, dict[str, Any]]] = []  # JSON events the service sent
        self.transports: list[MemoryTransport] = []

    def of_type(self, type_: str, conn: int | None = None) -> list[dict[str, Any]]:
        return [e for n, e in self.events
                if e["type"] == type_ and (conn is None or n == conn)]

    @asynccontextmanager
    async def connect(self, endpoint: Endpoint) -> AsyncIterator[Transport]:
        self.attempts += 1
        if self.attempts <= self.script.refuse_first:
            await trio.sleep(0.01)
            raise RuntimeFailure("cannot connect to the fake service: refused")
        client, server = memory_pair()
        index = self.connections
        self.connections += 1
        self.transports.append(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_Session(self, index, server).run)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()


class _Session:
    def __init__(self, service: FakeService, index: int, transport: MemoryTransport) -> None:
        self.service = service
        self.script = service.script
        self.index = index
        self.t = transport
        self.vad = EnergyVad(RATE)
        self.ids = 0
        self.done = 0
        self.turns = 0
        self.replies = 0
        self.reply: trio.CancelScope | None = None
        self.user_item = self._id("item")

    def _id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}_{self.index}_{self.ids}"

    async def send(self, type_: str, **body: Any) -> None:
        event = {"type": type_, "event_id": self._id("event"), **body}
        await self.t.send(json.dumps(event))
        self.service.sent.append((self.index, event))

    async def run(self) -> None:
        s = self.script
        async with trio.open_nursery() as nursery:
            try:
                await self.send("session.created", session={"id": self._id("sess"),
                                                             "model": "fake"})
                if s.fatal_code:
                    await self.send("error", error={"type": "invalid_request_error",
                                                    "code": s.fatal_code,
                                                    "message": f"The service says {s.fatal_code}."})
                if s.close_on_connect is not None:
                    await self.t.aclose(s.close_on_connect)
                while True:
                    event = json.loads(await self.t.receive())
                    self.service.events.append((self.index, event))
                    self.service.times.append(trio.current_time())
                    await self.handle(event, nursery)
            except LinkClosed:  # the client went away
                pass
            nursery.cancel_scope.cancel()

    async def handle(self, event: dict[str, Any], nursery: trio.Nursery) -> None:
        t = event["type"]
        if t == "session.update":
            await self.send("session.updated", session={"id": "sess"})
        elif t == "input_audio_buffer.append":
            pcm = np.frombuffer(base64.b64decode(event["audio"]), "<i2")
            for vad_event in self.vad.feed(pcm):
                if isinstance(vad_event, VadStarted):
                    await self.send("input_audio_buffer.speech_started", item_id=self.user_item,
                                    audio_start_ms=vad_event.audio_start_ms)
                    if self.reply is not None:  # interrupt_response
                        self.reply.cancel()
                else:
                    user, self.user_item = self.user_item, self._id("item")
                    await self.send("input_audio_buffer.speech_stopped", item_id=user,
                                    audio_end_ms=vad_event.audio_end_ms)
                    await self.send("input_audio_buffer.committed", item_id=user,
                                    previous_item_id=None)
                    nursery.start_soon(self.transcribe, user)
                    nursery.start_soon(self.respond)
        elif t == "conversation.item.truncate":
            await self.send("conversation.item.truncated", item_id=event["item_id"],
                            content_index=0, audio_end_ms=event["audio_end_ms"])
        elif t == "conversation.item.delete":
            await self.send("conversation.item.deleted", item_id=event["item_id"])
        elif t == "conversation.item.create":
            await self.send("conversation.item.added", item=event["item"])

    async def transcribe(self, item: str) -> None:
        self.turns += 1
        turn = self.turns
        await trio.sleep(self.script.transcript_delay)
        if self.script.transcription_fails:
            await self.send("conversation.item.input_audio_transcription.failed", item_id=item,
                            content_index=0, error={"type": "transcription_error",
                                                    "message": "could not transcribe"})
        else:
            await self.send("conversation.item.input_audio_transcription.completed",
                            item_id=item, content_index=0, transcript=f"(speech {turn})")

    async def respond(self) -> None:
        s = self.script
        await trio.sleep(s.reply_delay)
        if s.junk:
            await self.send("fake.unknown.event", note="?")
            await self.t.send("this frame is not JSON {")
            await self.t.send(b"\x00\x01 binary")
            await self.send("error", error={"type": "server_error", "code": "fake_junk",
                                            "message": "a non-fatal error"})
        if s.benign:
            await self.send("error", error={"type": "invalid_request_error",
                                            "code": "response_cancel_not_active",
                                            "message": "Cancellation failed: no active response "
                                                       "found."})
        rid, item = self._id("resp"), self._id("item")
        self.replies += 1
        text = f"*beep {self.index}.{self.replies}*"
        await self.send("response.created", response={"id": rid, "status": "in_progress"})
        await self.send("response.output_item.added", response_id=rid, output_index=0,
                        item={"id": item, "type": "message", "role": "assistant",
                              "content": []})
        await self.send("response.output_audio_transcript.delta", response_id=rid, item_id=item,
                        output_index=0, content_index=0, delta=text[:6])
        samples = round(s.reply_seconds * RATE)
        tone = (np.sin(np.arange(samples) * 2 * np.pi * 880 / RATE) * 6000).astype("<i2")
        status = "cancelled"
        with trio.CancelScope() as self.reply:
            for start in range(0, samples, CHUNK):
                pcm = tone[start:start + CHUNK].tobytes()
                await self.send("response.output_audio.delta", response_id=rid, item_id=item,
                                output_index=0, content_index=0,
                                delta=base64.b64encode(pcm).decode())
                await trio.sleep(CHUNK / RATE / s.realtime_factor)
            await self.send("response.output_audio_transcript.done", response_id=rid,
                            item_id=item, output_index=0, content_index=0, transcript=text)
            status = "completed"
        self.reply = None
        await self.send("response.done", response={"id": rid, "status": status,
                                                   "usage": s.usage})
        self.done += 1
        if s.drop_after == self.done and (s.drop_on is None or self.index in s.drop_on):
            await self.misbehave()

    async def misbehave(self) -> None:
        how = self.script.drop
        if how == "silent":
            self.t.go_silent()
        elif how == "abort":
            await self.t.aclose(1006)
        elif how == "close":
            await self.t.aclose(1011)
        else:
            await self.send("error", error={"type": "invalid_request_error",
                                            "code": "session_expired",
                                            "message": "Your session hit the maximum duration."})
            await self.t.aclose(1000)


# --------------------------------------------------------------------------- run helpers


def speech(*parts: float) -> np.ndarray:
    """Alternating tone (a turn) and silence of the given lengths in seconds, int16 24 kHz."""
    out = []
    for i, seconds in enumerate(parts):
        n = round(seconds * RATE)
        if i % 2 == 0:
            t = np.arange(n) / RATE
            out.append((np.sin(2 * np.pi * 300 * t) * 6000).astype(np.int16))
        else:
            out.append(np.zeros(n, np.int16))
    return np.concatenate(out)


def fast(*parts: float) -> FileSource:
    """:func:`speech` as a file source read as fast as the pipeline takes it."""
    return FileSource(speech(*parts), realtime=False, vad=VadParams())


def realtime(*parts: float) -> FileSource:
    """:func:`speech` as a file source paced like a microphone (on the test's clock)."""
    return FileSource(speech(*parts), realtime=True, vad=VadParams())


class NullSink:
    """A speaker that plays everything the moment it arrives."""

    async def run(self, receive: trio.MemoryReceiveChannel[Any], buffer: Any) -> None:
        async with receive:
            async for chunk in receive:
                buffer.push(chunk.item_id, chunk.pcm)
                buffer.read(buffer.queued_samples())


class MemorySessions:
    """Sessions and records in memory: ``records`` holds (session id, record) in write order."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.records: list[tuple[str, Any]] = []

    async def begin(self, previous: str | None, metadata: dict[str, Any] | None = None) -> str:
        sid = f"s{len(self.rows)}"
        self.rows[sid] = {"previous": previous}
        return sid

    async def end(self, session_id: str, stats: dict[str, int]) -> None:
        self.rows[session_id]["stats"] = stats

    async def context(self, chain: list[str], limit: int) -> list[tuple[str, str]]:
        turns = [(a.role, a.text) for sid, a in self.messages() if sid in chain]
        return turns[-limit:]

    async def record(self, session_id: str, actions: list[Any]) -> None:
        self.records += [(session_id, a) for a in actions]

    def messages(self) -> list[tuple[str, Any]]:
        """Stored messages in conversation order (session, then seq), partial ones too."""
        from r2d2voice.protocol.actions import StoreMessage

        msgs = {(sid, a.item_id): (sid, a) for sid, a in self.records
                if isinstance(a, StoreMessage)}
        order = list(self.rows)
        return sorted(msgs.values(), key=lambda m: (order.index(m[0]), m[1].seq))

    def roles(self) -> list[str]:
        return [a.role for _, a in self.messages()]

    def of_type(self, cls: type) -> list[Any]:
        return [a for _, a in self.records if isinstance(a, cls)]
