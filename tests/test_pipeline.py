"""The pipeline's channel policies, shutdown order and link upkeep, on a MockClock against the
scripted service: a slow database never loses a transcript, a stuck speaker never stalls the
conversation, a silent (half-open) link is found by ping and replaced, a stop drains within its
deadlines even when the store hangs. One real-socket check of the websocket transport."""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_service import FakeService, MemorySessions, NullSink, Script, speech
from local_link import run_conversation
from support import local_backend

from r2d2voice.appliance import pipeline
from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.pipeline import RECORD_DRAIN, STOP_GRACE
from r2d2voice.appliance.sinks import WavSink
from r2d2voice.appliance.sources import FileSource, VadParams
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.state import LinkPolicy
from r2d2voice.link.transport import Endpoint, LinkClosed, open_realtime
from r2d2voice.protocol.actions import StoreError, StoreLatency, StoreResponse
from r2d2voice.realtime.client_events import SessionConfig

CFG = SessionConfig(instructions="x")
ENDPOINT = Endpoint("mem://fake", "m")


def source(*parts: float, realtime: bool = False) -> FileSource:
    return FileSource(speech(*parts), realtime=realtime, vad=VadParams())


async def test_a_slow_database_makes_the_downlink_wait_never_drop(
    autojump_clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline, "RECORDS_BOUND", 1)

    class SlowSessions(MemorySessions):
        async def record(self, session_id: str, actions: list[Any]) -> None:
            await trio.sleep(0.3)  # a database on a slow SD card
            await super().record(session_id, actions)

    sessions = SlowSessions()
    service = FakeService()
    with caplog.at_level(logging.WARNING):
        ctx = await run_conversation(ENDPOINT, CFG, source(1.0, 1.0, 1.0), NullSink(), sessions,
                                     sessions.record, connect=service.connect)
    assert sessions.roles() == ["user", "assistant", "user", "assistant"]
    assert ctx.stats.record_waits > 0
    assert "recorder is behind" in caplog.text


async def test_a_stuck_speaker_never_stalls_the_conversation(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "AUDIO_BOUND", 2)

    class StuckSink:
        """Takes one chunk a second: a speaker whose device blocked."""

        async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                      buffer: PlayoutBuffer) -> None:
            async with receive:
                async for _ in receive:
                    await trio.sleep(1.0)

    sessions = MemorySessions()
    service = FakeService(Script(realtime_factor=50))  # the reply arrives all at once
    ctx = await run_conversation(ENDPOINT, CFG, source(1.0, 1.0, 1.0), StuckSink(), sessions,
                                 sessions.record, connect=service.connect)
    # both turns answered and stored although the speaker took almost nothing
    assert sessions.roles() == ["user", "assistant", "user", "assistant"]
    assert ctx.stats.audio_chunks_dropped > 0


async def test_a_silent_link_is_found_by_ping_and_replaced(autojump_clock) -> None:
    """The first connection goes silent after its reply (no FIN, no RST: half-open)."""
    service = FakeService(Script(drop_after=1, drop="silent", drop_on=(0,)))
    sessions = MemorySessions()
    policy = LinkPolicy(ping_interval=1.0, ping_timeout=1.0, backoff_initial=0.2)
    # turn one, 6 s of quiet (the link dies in it), turn two: in real time, like a person
    ctx = await run_conversation(ENDPOINT, CFG, source(1.0, 6.0, 1.0, realtime=True),
                                 NullSink(), sessions, sessions.record, connect=service.connect,
                                 policy=policy, rng=random.Random(0))
    assert service.connections == 2
    assert ctx.stats.reconnects == 1
    assert sessions.roles() == ["user", "assistant", "user", "assistant"]
    assert [e.message for e in sessions.of_type(StoreError)] == ["ping timeout"]


async def test_fast_replay_waits_for_each_reply_and_realtime_is_paced(autojump_clock) -> None:
    """Fast: the next turn's audio goes out only once the reply is done. Realtime: 20 ms of
    audio per 20 ms, whatever the service does."""
    fast = FakeService(Script(reply_delay=3.0))
    sessions = MemorySessions()
    await run_conversation(ENDPOINT, CFG, source(1.0, 1.0, 1.0), NullSink(), sessions,
                           sessions.record, connect=fast.connect)
    appends = [t for (_, e), t in zip(fast.events, fast.times, strict=True)
               if e["type"] == "input_audio_buffer.append"]
    # the whole first turn went out at once, then nothing for the 3 s + 1 s of the reply
    gaps = [b - a for a, b in itertools.pairwise(appends)]
    assert max(gaps) >= 4.0 and appends[0] - fast.times[0] < 0.1

    paced = FakeService(Script(reply_delay=3.0))
    t0 = trio.current_time()
    file = source(1.0, 1.0, 1.0, realtime=True)
    await run_conversation(ENDPOINT, CFG, file, NullSink(), MemorySessions(),
                           MemorySessions().record, connect=paced.connect)
    appends = [t for (_, e), t in zip(paced.events, paced.times, strict=True)
               if e["type"] == "input_audio_buffer.append"]
    assert appends[-1] - t0 == pytest.approx(file.seconds - 0.02, abs=0.03)


async def test_sigterm_racing_a_slow_recorder_loses_nothing(autojump_clock) -> None:
    class SlowSessions(MemorySessions):
        async def record(self, session_id: str, actions: list[Any]) -> None:
            await trio.sleep(1.5)
            await super().record(session_id, actions)

        async def end(self, session_id: str, stats: dict[str, int]) -> None:
            self.ended_at = trio.current_time()
            await super().end(session_id, stats)

    service = FakeService(Script(reply_seconds=2.0))
    sessions = SlowSessions()
    stopper = Stopper()
    async with trio.open_nursery() as nursery:

        async def signal() -> None:
            await trio.sleep(6.5)  # in the second reply
            nursery.stop_at = trio.current_time()  # type: ignore[attr-defined]
            stopper.stop("signal")

        nursery.start_soon(signal)
        ctx = await run_conversation(ENDPOINT, CFG, source(1.0, 3.0, 1.0, 3.0, 1.0,
                                                           realtime=True),
                                     NullSink(), sessions, sessions.record,
                                     connect=service.connect, stopper=stopper)
        returned = trio.current_time()
    stopped = nursery.stop_at  # type: ignore[attr-defined]
    assert ctx.stopped
    # the link and the session row were done within the grace, the recorder after it
    assert sessions.ended_at - stopped <= STOP_GRACE
    assert returned - stopped <= STOP_GRACE + RECORD_DRAIN
    # every transcript the service sent before the stop is stored, the cut reply partially
    sent = {e["item_id"] for _, e in service.sent
            if e["type"] in ("conversation.item.input_audio_transcription.completed",
                             "response.output_audio_transcript.done")}
    stored = {m.item_id: m for _, m in sessions.messages()}
    assert sent <= set(stored) and len(sent) >= 3
    assert [m.partial for m in stored.values() if m.item_id not in sent] == [True]
    assert "stats" in sessions.rows["s0"]


async def test_a_hung_store_cannot_hold_the_stop_past_its_deadlines(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    class HungSessions(MemorySessions):
        async def record(self, session_id: str, actions: list[Any]) -> None:
            await trio.sleep_forever()  # a stalled SD card

        async def end(self, session_id: str, stats: dict[str, int]) -> None:
            await trio.sleep_forever()

    stopper = Stopper()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _stop_after(stopper, 3.0))
        await run_conversation(ENDPOINT, CFG, source(1.0, 1.0, 1.0, 1.0, realtime=True),
                               NullSink(), HungSessions(), HungSessions().record,
                               connect=FakeService().connect, stopper=stopper)
    assert trio.current_time() - t0 <= 3.0 + STOP_GRACE + RECORD_DRAIN
    assert "records unwritten" in caplog.text


async def _stop_after(stopper: Stopper, seconds: float) -> None:
    await trio.sleep(seconds)
    stopper.stop("signal")


async def test_status_follows_the_speaker_without_polling(
    autojump_clock, tmp_path: Path
) -> None:
    class Console:
        def __init__(self) -> None:
            self.seen: list[tuple[str, float]] = []

        def transcript(self, role: str, text: str) -> None:
            pass

        def status(self, text: str) -> None:
            if not self.seen or self.seen[-1][0] != text:
                self.seen.append((text, trio.current_time()))

    class Sessions(MemorySessions):
        async def end(self, session_id: str, stats: dict[str, int]) -> None:
            self.ended_at = trio.current_time()
            await super().end(session_id, stats)

    console = Console()
    service = FakeService(Script(reply_seconds=2.0, realtime_factor=10, reply_delay=0.5))
    sessions = Sessions()
    await run_conversation(ENDPOINT, CFG, source(1.0, 1.0, realtime=True),
                           WavSink(str(tmp_path / "r.wav"), realtime=True), sessions,
                           sessions.record, connect=service.connect, console=console,
                           buffer=PlayoutBuffer(clock=trio.current_time), settle_seconds=5.0)
    assert [text for text, _ in console.seen] == [
        "listening", "listening (you are speaking)", "listening", "thinking", "speaking",
        "listening"]
    # the reply arrived in 0.2 s and played for 2 s: "listening" came back when the speaker
    # drained, with no server event then, seconds before the connection closed
    speaking, listening = console.seen[-2][1], console.seen[-1][1]
    assert listening - speaking == pytest.approx(2.0, abs=0.05)
    assert sessions.ended_at - listening >= 4.0
    [final] = [r for r in sessions.of_type(StoreResponse) if r.status == "completed"]
    [played] = sessions.of_type(StoreLatency)
    # one clock for both latencies: the first audio came 0.5 s after the end of speech and
    # the speaker took it at its next 20 ms tick
    assert final.first_audio_ms == pytest.approx(500, abs=1)
    assert 0 <= played.first_played_ms - final.first_audio_ms <= 21


async def test_the_websocket_transport_against_the_local_backend() -> None:
    """Real sockets: frames both ways, a ping answered, a close seen as LinkClosed."""
    async with local_backend() as url, open_realtime(Endpoint(url, "m")) as transport:
        created = json.loads(await transport.receive())
        assert created["type"] == "session.created"
        with trio.fail_after(5):
            await transport.ping()
        await transport.send(json.dumps({"type": "no.such.event", "event_id": "evt_1"}))
        error = json.loads(await transport.receive())
        assert error["type"] == "error"
        await transport.aclose()
        with pytest.raises(LinkClosed):
            await transport.receive()
