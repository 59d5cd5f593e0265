"""The budget as a state of the session gate, in a whole run (``compose.hold``) on trio's
MockClock: a live microphone hearing espeak-ng speech, the real local backend on loopback
websockets priced as if billed (each 1 s reply costs $0.10), real SQLite, and a wall clock that
moves with trio's so that the local day turns during the test.

At the cap the reply in progress plays out, the sad beep follows and the session closes;
STATUS says why; whoever speaks (or says the wake word) then gets the sad beep and no
connection; the next day a conversation opens again. A run that starts with the budget spent
(counted from the record) opens nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from storage_support import usage
from support import espeak_pcm, local_backend, silence, speech_frames
from test_listening import Backend, Console, Microphone, Speaker, stored

from r2d2voice.appliance.compose import Outcome, RunOptions, hold
from r2d2voice.audio import earcons
from r2d2voice.storage.database import Store
from r2d2voice.system.config import Settings

RATE = 24000
#: trio time 0 is 23:59:00 local time: the day turns 60 s into the run
START = datetime(2026, 3, 30, 23, 59).astimezone()
MIDNIGHT_S = 60.0
CLOSED = "daily budget reached ($0.10 of $0.10), back tomorrow"


@pytest.fixture(autouse=True)
def _inline_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's SQLite calls run inline (on the MockClock, time would jump meanwhile)."""

    async def run_sync(fn: Any, *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def wall() -> datetime:
    """The wall clock, moving with trio's."""
    return START + timedelta(seconds=trio.current_time())


def priced(tmp_path: Path, **kw: Any) -> Settings:
    """The local backend billed at $5,000 per 1M audio tokens out: a 1 s reply is $0.10."""
    prices = {f"price_{k}": 0.0 for k in ("audio_in", "audio_in_cached", "text_in",
                                            "text_in_cached", "text_out")}
    return Settings(db=tmp_path / "r2.db", backend="local", bill_local=True,
                    price_audio_out=5000.0, budget_daily_usd=0.1, vad_silence_ms=300,
                    **prices, **kw)


def at(pieces: list[tuple[float, np.ndarray]], seconds: float) -> np.ndarray:
    """``pcm`` pieces placed at their times (seconds) in ``seconds`` of silence."""
    out = silence(seconds)
    for start, pcm in pieces:
        i = round(start * RATE)
        out[i:i + len(pcm)] = pcm
    return out


def kinds(speaker: Speaker) -> list[str]:
    return [item.split(":")[1].split("-")[0] if earcons.is_earcon(item) else "reply"
            for item, _ in speaker.items]


def sent_frames(backend: Backend) -> set[bytes]:
    sent = b"".join(bytes(a) for a in backend.audio.values())
    return {sent[i:i + 960] for i in range(0, len(sent), 960)}


async def run(settings: Settings, mic: Microphone, speaker: Speaker, backend: Backend,
              console: Console, **options: Any) -> Outcome:
    async with local_backend(observer=backend, reply_seconds=1.0, realtime_factor=5) as url:
        return await hold(settings, mic, speaker, RunOptions(
            url=url, console=console, wall_clock=wall, **options))


async def test_always_listening_closes_at_the_cap_beeps_and_opens_the_next_day(
        autojump_clock, tmp_path: Path) -> None:
    first = espeak_pcm("hello robot, how are you", tmp_path)
    (tmp_path / "2").mkdir()
    refused = espeak_pcm("are you there, little robot", tmp_path / "2")
    (tmp_path / "3").mkdir()
    again = espeak_pcm("good morning, robot", tmp_path / "3")
    pcm = at([(0.5, first), (25.0, refused), (70.0, again)], 90.0)
    backend, console, speaker = Backend(), Console(), Speaker()
    changes: list[str | None] = []
    outcome = await run(priced(tmp_path), Microphone(pcm), speaker, backend, console,
                        on_budget=changes.append)

    # two sessions: the first until its reply had cost the day's $0.10, the second the next day
    rows = stored(tmp_path)
    assert len(rows) == 2 and len(backend.sessions()) == 2
    assert [[role for role, _ in r["messages"]] for r in rows] == [["user", "assistant"]] * 2
    assert outcome.spent == pytest.approx(0.2)
    # the reply played out, then the sad beep; speech while closed: the sad beep, no
    # connection; the next day the conversation, and at its cap the sad beep again
    assert kinds(speaker) == ["reply", "sad", "sad", "reply", "sad"]
    (_, reply_at), (_, closed_at), (_, refused_at) = speaker.items[:3]
    assert closed_at - reply_at >= 1.0  # the 1 s reply played whole before the beep
    assert 25.0 < refused_at < 25.0 + len(refused) / RATE + 1
    assert refused_at < MIDNIGHT_S < speaker.items[3][1]
    # nothing of what was said while closed reached the service
    assert not (set(speech_frames(refused)) - {bytes(960)}) & sent_frames(backend)
    assert set(speech_frames(again)) - {bytes(960)} <= sent_frames(backend)
    # STATUS said it while closed, and what it listens for once open again
    assert console.statuses.count(CLOSED) == 2
    reopened = console.statuses.index("listening for speech", console.statuses.index(CLOSED))
    assert CLOSED not in console.statuses[reopened:reopened + 2]
    assert changes == [CLOSED, None, CLOSED]
    assert outcome.budget is not None and outcome.budget.beeps == 3


async def test_a_spent_budget_keeps_the_wake_word_from_connecting(autojump_clock,
                                                                  tmp_path: Path) -> None:
    """A run woken at its cap: the conversation ends with the sad beep (no whistle), marked
    ``budget``; the next wake gets the sad beep alone. A restart the same day finds the spend
    in the record and connects for nobody."""
    request = espeak_pcm("hey mycroft, what is the weather like in london tomorrow", tmp_path)
    pcm = at([(0.5, request), (20.0, request)], 35.0)
    settings = replace(priced(tmp_path), listen="wake", conversation_idle_s=5.0)
    backend, console, speaker = Backend(), Console(), Speaker()
    outcome = await run(settings, Microphone(pcm), speaker, backend, console)
    (conversation,) = outcome.conversations
    assert conversation.ended == "budget"
    (row,) = stored(tmp_path)
    assert row["meta"]["conversation_end"] == "budget"
    assert [role for role, _ in row["messages"]] == ["user", "assistant"]
    assert kinds(speaker) == ["chirp", "reply", "sad", "sad"]
    assert console.statuses[-1] == CLOSED

    # the same day (the clock goes on from 23:59:35): counted from the record, it opens
    # nothing; the wake word gets the sad beep
    backend, console, speaker = Backend(), Console(), Speaker()
    outcome = await run(settings, Microphone(at([(0.5, request)], 10.0)), speaker, backend,
                        console)
    assert outcome.conversations == [] and backend.events == []
    assert kinds(speaker) == ["sad"]
    assert console.statuses == ["waiting for 'hey mycroft'", CLOSED]
    assert len(stored(tmp_path)) == 1


async def test_the_record_of_today_counts_and_yesterday_does_not(autojump_clock,
                                                                 tmp_path: Path) -> None:
    """$0.10 spent today, read from the database, is the day's cap: the run starts closed and
    STATUS says so; what was spent yesterday counts for nothing."""
    db = tmp_path / "r2.db"
    for label, day in (("today", START), ("yesterday", START - timedelta(days=1))):
        with Store.open(db, now=lambda day=day: day) as store:
            sid = store.write.start_session(backend="openai", model="m", voice=None)
            store.write.record_response(sid, response_id=label, status="completed",
                                        usage=usage(0, 0, 0, 0, 20))
    backend, console, speaker = Backend(), Console(), Speaker()
    talk = espeak_pcm("hello robot", tmp_path)
    outcome = await run(priced(tmp_path), Microphone(at([(5.0, talk)], 20.0)), speaker,
                        backend, console)
    assert backend.events == [] and outcome.session_ids == []
    assert console.statuses == ["daily budget reached ($0.10 of $0.10), back tomorrow"]
    assert kinds(speaker) == ["sad"]

