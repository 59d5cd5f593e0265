"""The real service's habits, client side: a fatal close ends the run (exit 3) after one
connection, an expired session is replaced at once with its context, late or missing
transcripts hold nothing up, the idle nudge is no utterance, audio of a cancelled reply is never
played, benign errors are no errors, a failed reply is recorded with its reason, and bursts,
pings, rate-limit events and extra fields change nothing. On a MockClock against the local
backend in memory (the scripted fake for what the backend cannot do); the fatal closes also end
to end through the CLI over real sockets."""

from __future__ import annotations

import logging
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
import trio
from fake_service import FakeService, MemorySessions, NullSink, Script, fast, realtime
from local_link import CFG, ENDPOINT, LocalLink, inline_threads, run_conversation, talk
from support import SAMPLES, cli, local_backend

from r2d2voice.appliance.sinks import WavSink
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.errors import ConfigError
from r2d2voice.link.state import LinkPolicy
from r2d2voice.localbackend.faults import Faults
from r2d2voice.protocol.actions import StoreError, StoreInterrupted, StoreMessage, StoreResponse

FATAL = [("invalid_api_key", 3000), ("insufficient_quota", 1013), ("model_not_found", 4000)]


@pytest.fixture(autouse=True)
def _inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    inline_threads(monkeypatch)


@pytest.mark.parametrize(("kind", "code"), FATAL)
async def test_a_fatal_close_after_an_error_ends_the_run_after_one_connection(
    autojump_clock, kind: str, code: int
) -> None:
    link = LocalLink(faults=Faults(connect_error=kind))
    sessions = MemorySessions()
    with pytest.raises(ConfigError, match="the Realtime service refused") as refused:
        await talk(link, fast(1.0, 1.0), sessions=sessions,
                   policy=LinkPolicy(backoff_initial=0.1))
    assert kind in str(refused.value) and link.connections == 1
    assert [(e.code, e.fatal) for e in sessions.of_type(StoreError)] == [(kind, True)]
    assert "stats" in sessions.rows["s0"]  # the session was closed


@pytest.mark.parametrize("code", [3000, 1013, 4000])
async def test_a_fatal_close_without_an_error_ends_the_run_too(
    autojump_clock, code: int
) -> None:
    service = FakeService(Script(close_on_connect=code))
    sessions = MemorySessions()
    with pytest.raises(ConfigError, match=f"closed the connection with code {code}"):
        await run_conversation(ENDPOINT, CFG, fast(1.0, 1.0), NullSink(), sessions,
                               sessions.record, connect=service.connect,
                               rng=random.Random(0))
    assert service.attempts == 1
    [stored] = sessions.of_type(StoreError)
    assert stored.fatal and stored.code == str(code)


async def test_an_expired_session_is_replaced_at_once_with_its_context(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    # the service ends every session after 6 s; a slow backoff shows the reconnect skips it
    link = LocalLink(faults=Faults(session_minutes=0.1))
    with caplog.at_level(logging.INFO):
        ctx, sessions = await talk(link, realtime(1.0, 2.0, 1.0, 3.0, 1.0),
                                   policy=LinkPolicy(backoff_initial=5.0))
    assert link.connections == 2
    assert link.opened[1] - link.opened[0] < 6.1  # at once, not after a backoff delay
    assert "reconnecting in" not in caplog.text
    # the second session was told what had been said, and the conversation went on
    context = link.of_type("conversation.item.create", 1)
    first = [m for sid, m in sessions.messages() if sid == "s0"]
    assert [c["item"]["content"][0]["text"] for c in context] == [m.text for m in first]
    assert [m.role for sid, m in sessions.messages() if sid == "s1"] == ["user", "assistant"]
    assert ctx.stats.reconnects == 1 and sessions.rows["s1"]["previous"] == "s0"


async def test_a_transcript_that_never_comes_holds_nothing_up(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    link = LocalLink(faults=Faults(transcript_outcome="never"))
    with caplog.at_level(logging.WARNING):
        _, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5))
    assert sessions.roles() == ["assistant", "assistant"]
    assert "no longer waiting for it" in caplog.text


async def test_late_transcripts_keep_their_place(autojump_clock) -> None:
    link = LocalLink(faults=Faults(transcript_delay="after_response_done"))
    _, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5))
    assert sessions.roles() == ["user", "assistant"] * 2
    written = [a.role for _, a in sessions.records if isinstance(a, StoreMessage)]
    assert written == ["assistant", "user"] * 2  # each transcript came after its reply


async def test_the_idle_nudge_is_answered_but_is_no_utterance(autojump_clock) -> None:
    link = LocalLink()
    config = replace(CFG, idle_timeout_ms=3000)
    _, sessions = await talk(link, realtime(1.0, 7.0), config=config)
    [update] = link.of_type("session.update")
    assert update["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 3000
    said = [(m.role, m.text) for _, m in sessions.messages()]
    assert said[0][0] == "user" and [r for r, _ in said[1:]] == ["assistant"] * (len(said) - 1)
    assert len(said) >= 3  # the turn's reply, then the nudge's reply
    assert all(text for _, text in said)  # no empty user message


async def test_audio_of_a_cancelled_reply_is_never_played(
    autojump_clock, tmp_path: Path
) -> None:
    """The second turn talks over a 6 s reply; the service still sends 3 deltas of it."""
    link = LocalLink(faults=Faults(leftover_audio_deltas=3, reply_seconds=6.0))
    sink = WavSink(str(tmp_path / "reply.wav"), realtime=True)
    ctx, sessions = await talk(link, realtime(1.0, 1.5, 1.0), sink=sink,
                               buffer=PlayoutBuffer(clock=trio.current_time))
    assert ctx.stats.leftover_deltas == 3
    [cut] = sessions.of_type(StoreInterrupted)
    reply = sf.read(tmp_path / "reply.wav", dtype="int16")[0]
    # what was played of the cut reply, then the whole second one: no leftover in between
    assert len(reply) / 24000 == pytest.approx(cut.played_ms / 1000 + 6.0, abs=0.05)
    assert not sessions.of_type(StoreError)  # a racing truncate would be benign anyway


async def test_benign_errors_are_logged_not_stored_or_counted(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    service = FakeService(Script(benign=True))
    sessions = MemorySessions()
    with caplog.at_level(logging.INFO):
        ctx = await run_conversation(ENDPOINT, CFG, fast(1.0, 1.0, 1.0), NullSink(), sessions,
                                     sessions.record, connect=service.connect,
                                     rng=random.Random(0))
    assert sessions.roles() == ["user", "assistant"] * 2
    assert not sessions.of_type(StoreError) and ctx.stats.service_errors == 0
    assert ctx.stats.benign_errors == 2
    assert caplog.text.count("no active response found") == 2


async def test_a_failed_reply_is_recorded_with_its_reason_and_the_conversation_goes_on(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    link = LocalLink(faults=Faults(fail_responses=((1, "failed"), (2, "content_filter"))))
    with caplog.at_level(logging.WARNING):
        _, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5, 1.0, 1.5))
    final = [r for r in sessions.of_type(StoreResponse) if r.status != "in_progress"]
    assert [r.status for r in final] == ["failed", "incomplete", "completed"]
    assert final[0].status_details["error"]["code"] == "rate_limit_exceeded"
    assert final[1].status_details["reason"] == "content_filter"
    assert "rate_limit_exceeded" in caplog.text and "content_filter" in caplog.text
    assert sessions.roles().count("user") == 3 and sessions.roles()[-1] == "assistant"


async def test_bursts_pings_rate_limits_and_extra_fields_change_nothing(autojump_clock) -> None:
    link = LocalLink(faults=Faults(audio_delta_ms=(250, 430), server_ping_s=0.5,
                                   rate_limits=True, extra_fields=True))
    ctx, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5))
    assert sessions.roles() == ["user", "assistant"] * 2
    assert ctx.stats.junk_messages == 0 and not sessions.of_type(StoreError)
    done = [r for r in sessions.of_type(StoreResponse) if r.status == "completed"]
    assert done[0].usage["output_token_details"]["reasoning_tokens"] > 0  # kept as sent


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("kind", "code"), FATAL)
async def test_fatal_closes_exit_3_after_one_connection_end_to_end(
    tmp_path: Path, kind: str, code: int
) -> None:
    db = tmp_path / "c.db"
    async with local_backend(faults=Faults(connect_error=kind)) as url:
        r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--url",
                      url, "--db", str(db), cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert err.startswith("r2d2voice: error: the Realtime service refused: ")
    assert len(err.strip().splitlines()) == 1 and kind in err
    con = sqlite3.connect(db)
    sessions = con.execute("SELECT count(*) FROM sessions").fetchone()[0]
    codes = [c for (c,) in con.execute("SELECT code FROM errors")]
    con.close()
    assert sessions == 1 and codes == [kind]
