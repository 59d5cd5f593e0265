"""Wake-word listening against the real local backend (loopback websockets, real SQLite), with
speech made by espeak-ng and the real microWakeWord model, on trio's MockClock: nothing is sent
until "hey mycroft"; each wake is one stored conversation that gets the pre-roll and closes
after the idle time (or when the robot hangs up); earcons reach the speaker, never the service
nor the reply WAV."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from support import espeak_pcm, load_audio, local_backend, silence, speech_frames

from r2d2voice.appliance.compose import Outcome, RunOptions, hold
from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.gate import PREROLL_FRAMES, WakeGate, WakeTrigger
from r2d2voice.appliance.pipeline import STOP_GRACE
from r2d2voice.appliance.sinks import WavSink
from r2d2voice.appliance.sources import FileSource, VadParams
from r2d2voice.appliance.tools import Toolbox
from r2d2voice.audio import earcons
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer
from r2d2voice.link.transport import Endpoint, Transport, open_realtime
from r2d2voice.localbackend.script import Script, ScriptTurn
from r2d2voice.system.config import Settings

RATE = 24000
IDLE = 20.0
REPLY_S = 1.0
REQUEST = "hey mycroft, what is the weather like in london tomorrow"


@pytest.fixture(autouse=True)
def _inline_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's SQLite calls (real ones) run inline instead of in a worker thread: on the
    MockClock, time would otherwise jump to the next deadline whenever the database works."""

    async def run_sync(fn: Any, *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


class Backend:
    """What the local backend received: client event types and appended audio, per session."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.audio: dict[str, bytearray] = defaultdict(bytearray)

    def __call__(self, session_id: str, event: dict[str, Any]) -> None:
        self.events.append((session_id, event["type"]))
        if event["type"] == "input_audio_buffer.append":
            self.audio[session_id] += base64.b64decode(event["audio"])

    def sessions(self) -> list[str]:
        return list(dict.fromkeys(sid for sid, _ in self.events))


class Console:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def transcript(self, role: str, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        if not self.statuses or self.statuses[-1] != text:
            self.statuses.append(text)


class Speaker:
    """A speaker: plays the playout buffer at 20 ms a block, keeps what it played (earcons
    included) and when each item arrived."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.items: list[tuple[str, float]] = []
        self.sounding: np.ndarray | None = None  # the block playing now

    @property
    def played(self) -> np.ndarray:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        finished = trio.Event()

        async def take() -> None:
            async with receive:
                async for chunk in receive:
                    if not self.items or self.items[-1][0] != chunk.item_id:
                        self.items.append((chunk.item_id, trio.current_time()))
                    buffer.push(chunk.item_id, chunk.pcm)
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            tick = trio.current_time()
            while not (finished.is_set() and buffer.queued_samples() == 0):
                tick += 0.02
                await trio.sleep_until(tick)
                block = buffer.read(480)
                self.sounding = block if len(block) else None
                if len(block):
                    self.blocks.append(block)


class Timed:
    """Notes when each item's chunks reached the sink ``inner`` (trio's clock): the first and
    the last."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.items: dict[str, list[float]] = {}

    async def run(self, receive: trio.MemoryReceiveChannel[AudioChunk],
                  buffer: PlayoutBuffer) -> None:
        send, passed = trio.open_memory_channel[AudioChunk](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.inner.run, passed, buffer)
            async with send, receive:
                async for chunk in receive:
                    now = trio.current_time()
                    self.items.setdefault(chunk.item_id, [now, now])[1] = now
                    await send.send(chunk)


class Microphone:
    """A live microphone hearing ``pcm`` (and the ``speaker`` 20 dB down, if given): a frame
    every 20 ms; like a capture device it never waits (a full channel drops the frame)."""

    live = True
    resends = False

    def __init__(self, pcm: np.ndarray, speaker: Speaker | None = None) -> None:
        self.frames = speech_frames(pcm)
        self.speaker = speaker
        self.frames_dropped = 0
        self.urgency: list[bool] = []  # what the listener said: no batching in a conversation

    def set_urgent(self, urgent: bool) -> None:
        self.urgency.append(urgent)

    def hear(self, frame: bytes) -> bytes:
        sounding = self.speaker.sounding if self.speaker is not None else None
        if sounding is None:
            return frame
        mixed = np.frombuffer(frame, "<i2").astype(np.int32)
        mixed[:len(sounding)] += sounding // 10
        return mixed.astype("<i2").tobytes()

    async def run(self, send: trio.MemorySendChannel[bytes], turns: Any) -> None:
        async with send:
            start = trio.current_time()
            for i, frame in enumerate(self.frames):
                await trio.sleep_until(start + i * 0.02)
                try:
                    send.send_nowait(self.hear(frame))
                except trio.WouldBlock:
                    self.frames_dropped += 1


async def listen_for_wake(settings: Settings, source: Any, sink: Any, *, url: str,
                          idle_s: float | None = None, **options: Any) -> Outcome:
    """A run that listens for the wake word (``compose.hold`` with ``R2D2_LISTEN=wake``)."""
    settings = replace(settings, listen="wake")
    if idle_s is not None:
        settings = replace(settings, conversation_idle_s=idle_s)
    return await hold(settings, source, sink, RunOptions(url=url, **options))


def slow_connect(delay: float) -> Any:
    """Connecting takes ``delay`` seconds (a far-away service), then the real websocket."""

    @asynccontextmanager
    async def connect(endpoint: Endpoint) -> AsyncIterator[Transport]:
        await trio.sleep(delay)
        async with open_realtime(endpoint) as transport:
            yield transport

    return connect


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(db=tmp_path / "r2.db", backend="local", conversation_idle_s=IDLE, **kw)


def file(pcm: np.ndarray, *, realtime: bool = False) -> FileSource:
    return FileSource(pcm, realtime=realtime, vad=VadParams())


def stored(tmp_path: Path) -> list[dict[str, Any]]:
    """Each session row: its metadata and its messages (role, text) in order."""
    with sqlite3.connect(tmp_path / "r2.db") as db:
        rows = db.execute("SELECT id, metadata FROM sessions ORDER BY seq").fetchall()
        return [{"id": sid, "meta": json.loads(meta),
                 "messages": db.execute("SELECT role, text FROM messages WHERE session_id = ? "
                                        "ORDER BY seq", (sid,)).fetchall()}
                for sid, meta in rows]


def speech_end(pcm: np.ndarray) -> float:
    """Where the speech in ``pcm`` ends (seconds)."""
    return float(np.nonzero(np.abs(pcm.astype(np.int32)) > 300)[0][-1] / RATE)


def transcript_seconds(text: str) -> float:
    """The local backend's user transcript ``(speech, N s)`` → N."""
    assert text.startswith("(speech, "), text
    return float(text.removeprefix("(speech, ").removesuffix(" s)"))


def assert_sent_from_the_wake(sent: bytes, pcm: np.ndarray, at_s: float) -> None:
    """The service got the input itself, contiguous from where the wake word ended: no earcon,
    no gap, the pre-roll first."""
    start = round(at_s * RATE)
    padded = np.concatenate([pcm, np.zeros(RATE * 5, np.int16)]).astype("<i2").tobytes()
    assert len(sent) > 0 and sent == padded[start * 2:start * 2 + len(sent)]


async def test_ordinary_speech_opens_no_connection(autojump_clock, tmp_path: Path) -> None:
    talk = espeak_pcm("the weather today is nice and sunny, shall we go for a walk in the park "
                      "and then have some tea with the neighbours before it gets dark", tmp_path)
    pcm = np.concatenate([talk] * (1 + int(40 * RATE // len(talk))))
    assert len(pcm) >= 40 * RATE
    backend, console = Backend(), Console()
    source = file(pcm)
    async with local_backend(observer=backend) as url:
        result = await listen_for_wake(settings(tmp_path), source, Speaker(), url=url,
                                       console=console)
    assert source.frames_read >= len(pcm) // 480  # the detector heard all of it
    assert backend.events == [] and result.conversations == []
    assert stored(tmp_path) == []  # no session either
    assert console.statuses == ["waiting for 'hey mycroft'"]


async def test_two_requests_give_two_stored_conversations_closed_when_idle(
    autojump_clock, tmp_path: Path
) -> None:
    said = espeak_pcm(REQUEST, tmp_path)
    gap = silence(25.0 - len(said) / RATE)
    pcm = np.concatenate([silence(0.5), said, gap, said, silence(IDLE + 5)])
    backend = Backend()
    sink = WavSink(str(tmp_path / "reply.wav"), realtime=False)
    timed = Timed(sink)
    async with local_backend(observer=backend, reply_seconds=REPLY_S,
                             realtime_factor=5) as url:
        result = await listen_for_wake(settings(tmp_path), file(pcm), timed, url=url)

    first, second = result.conversations
    assert [c.heard.source for c in result.conversations] == ["word", "word"]
    assert min(first.heard.score or 0, second.heard.score or 0) > 0.9
    assert second.heard.at_s - first.heard.at_s == pytest.approx(25.0, abs=0.1)
    # each answered, stored in its own session row, and closed after the idle time
    rows = stored(tmp_path)
    assert [r["id"] for r in rows] == result.session_ids and len(result.session_ids) == 2
    assert len(backend.sessions()) == 2
    for row, conversation in zip(rows, result.conversations, strict=True):
        assert [role for role, _ in row["messages"]] == ["user", "assistant"]
        assert conversation.ended == row["meta"]["conversation_end"] == "idle"
        assert conversation.seconds > IDLE
        assert row["meta"]["conversation_s"] == conversation.seconds
        assert row["meta"]["stats"]["user_turns"] == 1  # the link's counters are kept
        assert row["meta"]["wake_source"] == "word"
        assert row["meta"]["wake_score"] == conversation.heard.score
        assert conversation.ready_ms is not None
        assert row["meta"]["wake_ready_ms"] == conversation.ready_ms
    assert len(backend.audio) == 2
    for sent, conversation in zip(backend.audio.values(), result.conversations, strict=True):
        assert_sent_from_the_wake(bytes(sent), pcm, conversation.heard.at_s)
    # the whistle came the idle time after each reply had played
    replies = [times for item, times in timed.items.items() if not earcons.is_earcon(item)]
    whistles = [times for item, times in timed.items.items() if item.startswith("earcon:wh")]
    assert len(replies) == len(whistles) == 2
    for (_, reply_end), (whistle, _) in zip(replies, whistles, strict=True):
        assert whistle - reply_end == pytest.approx(IDLE, abs=0.3)
    # the WAV has the two replies and nothing else: the four earcons were skipped
    assert sink.earcons_skipped == 4
    assert len(load_audio(tmp_path / "reply.wav")) == 2 * REPLY_S * RATE


async def test_the_pre_roll_reaches_a_slow_service(autojump_clock, tmp_path: Path) -> None:
    """The request said in one breath with the wake word is over before the connection is
    (2 s): it is sent from the pre-roll, and transcribed whole."""
    said = espeak_pcm(REQUEST, tmp_path)
    pcm = np.concatenate([silence(0.5), said, silence(4.0)])
    backend = Backend()
    async with local_backend(observer=backend, realtime_factor=5) as url:
        result = await listen_for_wake(settings(tmp_path), file(pcm), Speaker(), url=url,
                                       idle_s=2.0, connect=slow_connect(2.0))
    (conversation,) = result.conversations
    request_s = speech_end(pcm) - conversation.heard.at_s
    assert request_s > 1.0  # most of the request follows the wake word...
    assert conversation.ready_ms is not None and conversation.ready_ms >= 2000  # ...and is
    # over before the service is ready
    [[user, text], [assistant, _]] = stored(tmp_path)[0]["messages"]
    assert (user, assistant) == ("user", "assistant")
    assert transcript_seconds(text) == pytest.approx(request_s, abs=0.4)
    (sent,) = backend.audio.values()
    assert_sent_from_the_wake(bytes(sent), pcm, conversation.heard.at_s)


async def test_an_external_wake_on_a_live_microphone(autojump_clock, tmp_path: Path) -> None:
    """``r2d2voice wake`` (the trigger) starts a conversation without the word. The speaker
    plays the chirp, the reply, the whistle; the microphone hears them, but none of that is
    sent (half duplex), while all of the request is. Statuses say what is going on."""
    request = espeak_pcm("what is the weather like in london tomorrow", tmp_path)
    pcm = np.concatenate([silence(1.8), request, silence(6.0)])
    backend, console, speaker, trigger = Backend(), Console(), Speaker(), WakeTrigger()
    async with local_backend(observer=backend, reply_seconds=REPLY_S,
                             realtime_factor=5) as url, trio.open_nursery() as nursery:

        async def press_the_button() -> None:
            await trio.sleep(1.0)
            trigger.wake()

        nursery.start_soon(press_the_button)
        microphone = Microphone(pcm, speaker)
        result = await listen_for_wake(settings(tmp_path), microphone, speaker,
                                       url=url, idle_s=3.0, trigger=trigger, console=console)
    (conversation,) = result.conversations
    assert microphone.urgency == [True, False]  # frame by frame only while in conversation
    assert conversation.heard.source == "external" and conversation.heard.score is None
    assert conversation.heard.at_s == pytest.approx(1.0, abs=0.05)
    (row,) = stored(tmp_path)
    assert row["meta"]["wake_source"] == "external" and row["meta"]["wake_score"] is None
    assert [role for role, _ in row["messages"]] == ["user", "assistant"]
    assert transcript_seconds(row["messages"][0][1]) == pytest.approx(
        len(request) / RATE, abs=0.4)
    # every frame sent is one of the room's own (nothing the speaker played is in it), and
    # every frame of the request was sent
    (sent,) = backend.audio.values()
    sent_frames = [bytes(sent[i:i + 960]) for i in range(0, len(sent), 960)]
    room = set(speech_frames(pcm))
    assert all(frame in room for frame in sent_frames)
    assert set(speech_frames(request)) - {bytes(960)} <= set(sent_frames)
    # the speaker played the chirp, then the reply, then the whistle
    kinds = [item.split(":")[1].split("-")[0] if earcons.is_earcon(item) else "reply"
             for item, _ in speaker.items]
    assert kinds == ["chirp", "reply", "whistle"]
    played = speaker.played
    chirp, whistle = earcons.chirp(), earcons.whistle()
    assert np.array_equal(played[:len(chirp)], chirp)
    assert np.array_equal(played[-len(whistle):], whistle)
    assert len(played) == len(chirp) + REPLY_S * RATE + len(whistle)
    assert console.statuses[:2] == ["waiting for 'hey mycroft'", "in conversation (connecting)"]
    assert "in conversation (speaking)" in console.statuses
    assert console.statuses[-1] == "waiting for 'hey mycroft'"


async def test_earcons_off_are_not_played(autojump_clock, tmp_path: Path) -> None:
    said = espeak_pcm(REQUEST, tmp_path)
    speaker = Speaker()
    async with local_backend(reply_seconds=REPLY_S, realtime_factor=5) as url:
        result = await listen_for_wake(settings(tmp_path, earcons=False),
                                       file(np.concatenate([said, silence(3.0)])), speaker,
                                       url=url, idle_s=1.0)
    assert len(result.conversations) == 1
    assert [earcons.is_earcon(item) for item, _ in speaker.items] == [False]


async def test_realtime_and_fast_replays_give_the_same_conversations(
    autojump_clock, tmp_path: Path
) -> None:
    said = espeak_pcm(REQUEST, tmp_path)
    pcm = np.concatenate([silence(0.5), said, silence(4.0), said, silence(3.0)])
    outcomes = []
    for speed in ("fast", "realtime"):
        (tmp_path / speed).mkdir()
        async with local_backend(realtime_factor=5) as url:
            result = await listen_for_wake(settings(tmp_path / speed),
                                           file(pcm, realtime=speed == "realtime"), Speaker(),
                                           url=url, idle_s=2.0)
        rows = stored(tmp_path / speed)
        outcomes.append([(c.heard.at_s, c.ended, row["messages"][0])
                         for c, row in zip(result.conversations, rows, strict=True)])
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 2


@pytest.mark.parametrize("live", [False, True])
async def test_the_robot_hanging_up_ends_the_conversation(autojump_clock, tmp_path: Path,
                                                          live: bool) -> None:
    """``end_conversation``: after the goodbye the connection closes by itself; the
    conversation ends there, not after the idle time, and no second session starts (the
    link would otherwise wait for speech on a microphone, reconnect at once on a file)."""
    said = espeak_pcm(REQUEST, tmp_path)
    pcm = np.concatenate([silence(0.5), said, silence(IDLE + 5)])
    script = Script((ScriptTurn(call="end_conversation"),))
    backend, speaker = Backend(), Speaker()
    async with local_backend(observer=backend, script=script, realtime_factor=5) as url:
        result = await listen_for_wake(settings(tmp_path), Microphone(pcm) if live else file(pcm),
                                       speaker, url=url, toolbox=Toolbox(("end_conversation",)))
    (conversation,) = result.conversations
    assert conversation.ended == "ended" and conversation.seconds < IDLE
    assert len(backend.sessions()) == 1 and len(stored(tmp_path)) == 1
    assert earcons.is_earcon(speaker.items[-1][0])  # the whistle after the goodbye


async def test_a_stop_in_a_conversation_ends_the_run_promptly_keeping_what_was_said(
    autojump_clock, tmp_path: Path
) -> None:
    said = espeak_pcm(REQUEST, tmp_path)
    microphone = Microphone(np.concatenate([silence(0.5), said, silence(120.0)]))
    stopper, speaker = Stopper(), Speaker()
    async with local_backend(reply_seconds=REPLY_S, realtime_factor=5) as url, \
            trio.open_nursery() as nursery:

        async def sigterm() -> None:
            await trio.sleep(8.0)  # answered, within the idle time
            stopper.stop("signal")

        nursery.start_soon(sigterm)
        result = await listen_for_wake(settings(tmp_path), microphone, speaker, url=url,
                                       stopper=stopper)
        stopped_after = trio.current_time()
    assert stopped_after - 8.0 <= STOP_GRACE + 0.5
    (conversation,) = result.conversations
    assert conversation.ended == "stopped"
    (row,) = stored(tmp_path)
    assert [role for role, _ in row["messages"]] == ["user", "assistant"]
    assert row["meta"]["conversation_end"] == "stopped"
    assert [earcons.is_earcon(item) for item, _ in speaker.items] == [True, False]  # no whistle


class Deaf:
    """A detector that hears nothing (the wake comes from the trigger)."""

    wake_word = "hey test"

    def process(self, frame: bytes) -> None:
        return None


def test_the_pre_roll_held_while_connecting_drops_its_oldest_frames() -> None:
    async def main() -> tuple[list[bytes] | None, int]:
        trigger = WakeTrigger()
        gate = WakeGate(Deaf(), idle_s=1.0, wake_word="x", console=Console(),  # type: ignore[arg-type]
                        trigger=trigger)
        trigger.wake()
        gate.route(b"wake", [b"wake"], 0)  # the wake: this frame is the detector's
        for i in range(PREROLL_FRAMES + 2):
            assert gate.route(b"", [i.to_bytes(2, "big")], i + 1) == []  # held, not sent
        preroll = gate.take_preroll()
        assert gate.route(b"", [b"live"], PREROLL_FRAMES + 3) == [b"live"]  # connected now
        return preroll, gate.dropped

    preroll, dropped = trio.run(main)
    assert dropped == 2 and preroll is not None and len(preroll) == PREROLL_FRAMES
    assert preroll[0] == (2).to_bytes(2, "big") and preroll[-1] == (
        PREROLL_FRAMES + 1).to_bytes(2, "big")


async def test_the_second_woken_conversation_knows_what_the_first_remembered(
    autojump_clock, tmp_path: Path
) -> None:
    """Each session's instructions are made as it starts: a fact the robot was asked to keep in
    the first conversation of a run is in the second's."""
    said = espeak_pcm(REQUEST, tmp_path)
    pcm = np.concatenate([silence(0.5), said, silence(4.0), said, silence(3.0)])
    script = Script((ScriptTurn(call="remember", arguments=json.dumps(
        {"fact": "The cat is called Biscuit."})),))
    updates: list[str] = []

    def observe(session_id: str, event: dict[str, Any]) -> None:
        if event["type"] == "session.update":
            updates.append(event["session"].get("instructions", ""))

    async with local_backend(observer=observe, script=script, realtime_factor=5) as url:
        result = await listen_for_wake(settings(tmp_path), file(pcm), Speaker(), url=url,
                                       idle_s=2.0)
    assert len(result.conversations) == 2 and len(updates) == 2
    assert "Biscuit" not in updates[0]
    assert "The cat is called Biscuit." in updates[1].split("<remembered_facts>", 1)[1]
