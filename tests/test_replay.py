"""``r2d2voice replay``: end to end as a user runs it (the CLI, the local backend on real
sockets, SQLite), and the replay source and sink on a MockClock against the scripted service
(fast vs real-time pacing, any audio format)."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio
from fake_service import FakeService, MemorySessions, Script
from local_link import run_conversation
from support import SAMPLES, clean_env, cli, load_audio, local_backend, silence, tone

from r2d2voice.appliance.sinks import WavSink
from r2d2voice.appliance.sources import FileSource, VadParams
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.link.transport import Endpoint
from r2d2voice.localbackend.server import Faults
from r2d2voice.protocol.actions import StoreLatency, StoreResponse
from r2d2voice.realtime.client_events import SessionConfig

TWO_TURNS = SAMPLES / "two_turns.wav"
SECRET = "sk-test-SECRET-9f8e7d6c5b4a"


def messages(db: Path) -> list[dict[str, Any]]:
    """Stored messages in conversation order, with their session's ids and end."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT m.*, s.service_session_id, s.ended_at FROM messages m "
                       "JOIN sessions s ON s.id = m.session_id ORDER BY s.started_at, s.id, m.seq")
    out = [dict(r) for r in rows]
    con.close()
    return out


def messages_so_far(db: Path) -> list[dict[str, Any]]:
    """Messages of a database another process may still be creating (none until its schema)."""
    try:
        return messages(db) if db.exists() else []
    except sqlite3.OperationalError:
        return []


async def test_multi_turn_replay_stores_every_transcript_with_ids(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    r = await cli("replay", str(TWO_TURNS), "--backend", "local", "--db", str(db), cwd=tmp_path)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert out.count("you: (speech,") == 2 and out.count("r2: *") == 2
    assert "2 turns answered" in out
    rows = messages(db)
    assert [(m["role"], m["seq"]) for m in rows] == \
        [("user", 1), ("assistant", 2), ("user", 3), ("assistant", 4)]
    for m in rows:
        assert m["item_id"].startswith("item_") and m["text"]
        assert m["service_session_id"].startswith("sess_") and m["ended_at"]
        assert json.loads(m["raw_event"])["item_id"] == m["item_id"]
    assert all(m["response_id"].startswith("resp_") for m in rows if m["role"] == "assistant")
    con = sqlite3.connect(db)
    latencies = con.execute("SELECT first_audio_ms, first_played_ms FROM responses").fetchall()
    con.close()
    # both latencies of every turn are measured and stored
    assert len(latencies) == 2
    assert all(a is not None and b is not None and 0 <= a <= b for a, b in latencies)
    reply, rate = sf.read(tmp_path / "two_turns.reply.wav", dtype="int16")
    assert rate == 24000 and reply.ndim == 1
    assert len(reply) == pytest.approx(2 * 24000, abs=480)  # two whole 1 s replies
    assert np.abs(reply).max() > 3000  # audible beeps, not silence


async def replay_in_process(pcm: np.ndarray, out: Path, *, realtime: bool,
                            script: Script | None = None) -> MemorySessions:
    sessions = MemorySessions()
    service = FakeService(script or Script(reply_seconds=1.0))
    await run_conversation(Endpoint("mem://fake", "m"), SessionConfig("x"),
                           FileSource(pcm, realtime=realtime, vad=VadParams()),
                           WavSink(str(out), realtime=realtime), sessions, sessions.record,
                           connect=service.connect, buffer=PlayoutBuffer(clock=trio.current_time))
    return sessions


async def test_fast_and_realtime_replays_give_the_same_conversation(
    autojump_clock, tmp_path: Path
) -> None:
    pcm = load_audio(TWO_TURNS)
    runs = {}
    for speed in ("fast", "realtime"):
        out = tmp_path / f"{speed}.wav"
        sessions = await replay_in_process(pcm, out, realtime=speed == "realtime")
        msgs = [(m.role, m.seq, m.text) for _, m in sessions.messages()]
        # both latencies of every turn are measured, on one clock
        first_audio = {r.response_id: r.first_audio_ms for r in sessions.of_type(StoreResponse)
                       if r.status == "completed"}
        played = {r.response_id: r.first_played_ms for r in sessions.of_type(StoreLatency)}
        assert len(first_audio) == 2 and played.keys() == first_audio.keys()
        assert all(0 <= first_audio[k] <= played[k] for k in played)
        runs[speed] = (msgs, sf.read(out, dtype="int16")[0])
    assert runs["fast"][0] == runs["realtime"][0]
    assert [m[0] for m in runs["fast"][0]] == ["user", "assistant"] * 2
    assert len(runs["fast"][1]) == 2 * 24000
    assert np.array_equal(runs["fast"][1], runs["realtime"][1])


@pytest.mark.parametrize(("subtype", "rate", "channels", "fmt"), [
    ("PCM_U8", 8000, 1, "WAV"),
    ("PCM_24", 44100, 2, "WAVEX"),
    ("FLOAT", 48000, 2, "WAV"),
    ("PCM_32", 22050, 1, "WAV"),
    ("PCM_16", 16000, 1, "FLAC"),
])
async def test_odd_audio_formats_hold_the_same_conversation(
    autojump_clock, tmp_path: Path, subtype: str, rate: int, channels: int, fmt: str
) -> None:
    import soxr

    speech, src_rate = sf.read(TWO_TURNS, dtype="float32")
    x = soxr.resample(speech, src_rate, rate)
    if channels == 2:
        x = np.stack([x, x * 0.9], axis=1)
    path = tmp_path / ("odd.flac" if fmt == "FLAC" else "odd.wav")
    sf.write(path, x, rate, subtype=subtype, format=fmt)
    sessions = await replay_in_process(load_audio(path), tmp_path / "out.wav", realtime=False)
    assert sessions.roles() == ["user", "assistant"] * 2


@pytest.mark.parametrize("make", ["missing", "directory", "text", "empty", "zero_channels"])
async def test_unusable_input_is_one_line_exit_2(tmp_path: Path, make: str) -> None:
    path = tmp_path / f"{make}.wav"
    if make == "directory":
        path.mkdir()
    elif make == "text":
        path.write_text("this is not audio\n")
    elif make == "empty":
        sf.write(path, np.zeros(0, np.int16), 24000, subtype="PCM_16")
    elif make == "zero_channels":
        data = bytearray((SAMPLES / "hello.wav").read_bytes()[:44])
        data[22:24] = (0).to_bytes(2, "little")  # NumChannels = 0
        path.write_bytes(bytes(data))
    r = await cli("replay", str(path), "--backend", "local", "--db", str(tmp_path / "c.db"),
                  cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert path.name in err
    assert not (tmp_path / "c.db").exists()  # nothing started


async def test_rejected_key_exits_3_after_one_attempt(tmp_path: Path) -> None:
    attempts = 0

    async with local_backend(api_key="the-right-key") as url:
        port = int(url.split(":")[2].split("/")[0])

        async def proxy(client: trio.SocketStream) -> None:
            nonlocal attempts
            attempts += 1
            upstream = await trio.open_tcp_stream("127.0.0.1", port)
            async with client, upstream, trio.open_nursery() as n:
                async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send_all(chunk)
                    except trio.BrokenResourceError:
                        pass
                    n.cancel_scope.cancel()
                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, proxy, 0)
            proxy_port = listeners[0].socket.getsockname()[1]
            env = clean_env(HOME=str(tmp_path), OPENAI_API_KEY=SECRET)
            r = await cli("replay", str(TWO_TURNS), "--backend", "openai", "--url",
                          f"ws://127.0.0.1:{proxy_port}/v1/realtime", "--db",
                          str(tmp_path / "c.db"), cwd=tmp_path, env=env)
            nursery.cancel_scope.cancel()
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert "rejected the API key" in err and err.strip().count("\n") == 0
    assert SECRET not in err and SECRET not in r.stdout.decode()
    assert attempts == 1


async def test_missing_key_for_openai_backend_is_exit_3(tmp_path: Path) -> None:
    r = await cli("replay", str(TWO_TURNS), "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert r.returncode == 3
    assert "OPENAI_API_KEY is not set" in r.stderr.decode()


async def test_api_key_appears_in_no_output_log_or_database_byte(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with local_backend(api_key=SECRET, realtime_factor=20) as url:
        env = clean_env(HOME=str(tmp_path), OPENAI_API_KEY=SECRET)
        r = await cli("--log-level", "DEBUG", "replay", str(TWO_TURNS), "--backend", "openai",
                      "--url", url, "--db", str(db), cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr.decode()
        exports = [await cli("export", "--db", str(db), "--format", f, cwd=tmp_path, env=env)
                   for f in ("jsonl", "csv", "markdown")]
    assert len(messages(db)) == 4
    blobs = [r.stdout, r.stderr, *(e.stdout for e in exports)]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert b"DEBUG" in r.stderr  # the debug log really was on
    for blob in blobs:
        assert SECRET.encode() not in blob


async def test_sigterm_ends_a_replay_keeping_what_was_said(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    # a short first turn, then a long one the signal cuts
    wav = tmp_path / "talk.wav"
    sf.write(wav, np.concatenate([tone(0.6), silence(1.5), tone(5.0)]), 24000)
    async with local_backend(realtime_factor=20) as url, trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "r2d2voice", "replay", str(wav), "--speed", "realtime",
             "--backend", "local", "--url", url, "--db", str(db)],
            cwd=tmp_path, env=clean_env(HOME=str(tmp_path)), capture_stdout=True,
            capture_stderr=True, check=False, task_status=task_status))
        # wait for the first answer to be committed, then stop mid-conversation
        with trio.fail_after(30):
            while not any(m["role"] == "assistant" for m in messages_so_far(db)):
                await trio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()
    assert proc.returncode == 143  # an interrupted replay, as a shell reports SIGTERM
    rows = messages(db)
    assert rows[0]["role"] == "user" and rows[1]["role"] == "assistant"
    assert len(rows) < 4  # it really stopped before the end of the file
    assert rows[0]["ended_at"]  # the session got its end time


async def test_timeout_ends_the_replay_with_exit_1_and_a_closed_session(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20, faults=Faults(reply_delay_s=30)) as url:
        r = await cli("replay", str(TWO_TURNS), "--backend", "local", "--url", url,
                      "--timeout", "1.5", "--db", str(db), cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.strip().splitlines()[-1] == \
        "r2d2voice: error: replay timed out after 1.5 s; what was said is stored"
    rows = messages(db)
    assert [m["role"] for m in rows] == ["user"]  # the first turn is kept
    assert rows[0]["ended_at"]
