"""``replay --backend live`` end to end, as a user runs it: the CLI in a process of its own
against the local backend's GPT-Live mode on a loopback websocket, SQLite, the reply WAV, and
``usage``. Every client event the backend receives is checked (strictly) against the SDK's
``openai.types.live.ClientEvent``; then the record, the audio, the billed time and the faults
(expired, a lost connection, no credit left)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from livecheck import check_client
from support import SAMPLES, clean_env, cli, local_backend

from r2d2voice.localbackend.fault_options import parse_faults
from r2d2voice.localbackend.script import Script, ScriptTurn

TWO_TURNS = SAMPLES / "two_turns.wav"
#: what the robot says in each turn: non-ASCII, runs of spaces, an emoji (sent word by word)
SAID = ("Héllo  there,\u00a0friend 🤖! ", "Ça va?  Très\tbien… «R2»")
SCRIPT = Script(tuple(ScriptTurn(say=s) for s in SAID))


@dataclass
class Heard:
    """What the backend received: each connection's client events, in order."""

    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    def observe(self, session_id: str, event: dict[str, Any]) -> None:
        try:
            check_client(event)
        except Exception as exc:  # reported by the test, not the server
            self.invalid.append(f"{event.get('type')}: {exc}")
        self.sessions.setdefault(session_id, []).append(event)

    def starts(self) -> list[dict[str, Any]]:
        return [events[0] for events in self.sessions.values()]


@asynccontextmanager
async def live_backend(*faults: str, **config: Any) -> AsyncIterator[tuple[str, Heard]]:
    """The local backend (its Live path) and what it heard."""
    heard = Heard()
    config.setdefault("realtime_factor", 20)
    async with local_backend(observer=heard.observe, faults=parse_faults(list(faults)),
                             **config) as url:
        yield url.replace("/v1/realtime", "/v1/live/sessions"), heard


async def replay(url: str, tmp_path: Path, *extra: str) -> Any:
    return await cli("replay", str(TWO_TURNS), "--backend", "live", "--url", url,
                     "--db", str(tmp_path / "c.db"), "--out", str(tmp_path / "r.wav"), *extra,
                     cwd=tmp_path)


def stored(db: Path) -> list[dict[str, Any]]:
    """Messages in conversation order (sessions in order, then seq), with their session."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute(
        "SELECT m.*, s.seq AS session_seq, s.backend, s.model, s.voice FROM messages m "
        "JOIN sessions s ON s.id = m.session_id ORDER BY s.seq, m.seq")]
    con.close()
    return rows


def said(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["role"], r["text"]) for r in rows]


async def test_replay_holds_a_live_conversation_and_stores_it_byte_exact(
        tmp_path: Path) -> None:
    async with live_backend(script=SCRIPT) as (url, heard):
        r = await replay(url, tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert not heard.invalid
    [events] = heard.sessions.values()
    assert events[0]["type"] == "session.start"
    assert events[0]["session"]["model"] == "gpt-live-1"
    assert events[0]["session"]["audio"]["output"]["voice"] == "marin"
    assert {e["type"] for e in events[1:-1]} == {"session.input_audio.append"}
    assert events[-1]["type"] == "session.close"  # our close, answered with the usage
    rows = stored(tmp_path / "c.db")
    assert said(rows) == [("user", "(speech, 1.8 s)"), ("assistant", SAID[0]),
                          ("user", "(speech, 1.9 s)"), ("assistant", SAID[1])]
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    for row in rows:  # the evidence: the fragments, which concatenate to the text
        assert "".join(e["delta"] for e in json.loads(row["raw_event"])) == row["text"]
    out = r.stdout.decode()
    assert f"r2: {SAID[0]}" in out and "2 turns answered" in out
    reply, rate = sf.read(tmp_path / "r.wav", dtype="int16")
    assert rate == 24000 and len(reply) == 2 * 24000  # two whole 1 s replies
    assert np.abs(reply).max() > 3000  # audible beeps, not silence
    # the local backend says it is local: recorded so, its billed time shown, never priced
    assert {(r["backend"], r["model"], r["voice"]) for r in rows} == {("local", "local",
                                                                        "marin")}
    usage = await cli("usage", "--db", str(tmp_path / "c.db"), "--format", "json",
                      cwd=tmp_path)
    report = json.loads(usage.stdout)
    [session] = report["sessions"]
    assert session["live_seconds"] >= 7 and session["local_live_seconds"] == session[
        "live_seconds"]
    assert session["cost_usd"] == 0 and session["responses"] == 0
    assert report["price_live_usd_per_minute"] == 0.05


def history(start: dict[str, Any]) -> list[tuple[str, str]]:
    """The conversation a ``session.start`` seeds its session with."""
    return [(i["role"], i["content"][0]["text"]) for i in start["session"].get("input", [])]


async def test_an_expired_session_is_followed_at_once_by_one_seeded_with_what_was_said(
        tmp_path: Path) -> None:
    """``live_close=expired:2``: the service ends the session after its second reply; the
    conversation goes on in a new session that starts from the stored conversation."""
    async with live_backend("live_close=expired:2", script=SCRIPT) as (url, heard):
        r = await replay(url, tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert not heard.invalid
    first, second = heard.starts()
    assert history(first) == []
    rows = stored(tmp_path / "c.db")
    assert said(rows) == [("user", "(speech, 1.8 s)"), ("assistant", SAID[0]),
                          ("user", "(speech, 1.9 s)"), ("assistant", SAID[1])]
    assert history(second) == said(rows)  # in the order said, byte-exact
    con = sqlite3.connect(tmp_path / "c.db")
    chain = con.execute("SELECT id, previous_session_id, metadata FROM sessions "
                        "ORDER BY seq").fetchall()
    con.close()
    assert len(chain) == 2 and chain[1][1] == chain[0][0]
    assert json.loads(chain[1][2])["stats"]["reconnects"] == 1
    assert "session closed by the service (expired)" in r.stderr.decode()
    assert "reconnecting in" not in r.stderr.decode()  # at once, no backoff


async def test_a_lost_connection_reconnects_and_loses_nothing(tmp_path: Path) -> None:
    """``connection_lost`` after the first reply: reconnect with backoff, the next session
    seeded with the first turn, every turn answered and stored once."""
    async with live_backend("live_close=connection_lost:1", script=SCRIPT) as (url, heard):
        r = await replay(url, tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert not heard.invalid and "reconnecting in" in err
    starts = heard.starts()
    assert len(starts) >= 2 and history(starts[1]) == [("user", "(speech, 1.8 s)"),
                                                       ("assistant", SAID[0])]
    rows = stored(tmp_path / "c.db")
    # the second session's script starts again: its first reply says SAID[0] once more
    assert said(rows) == [("user", "(speech, 1.8 s)"), ("assistant", SAID[0]),
                          ("user", "(speech, 1.9 s)"), ("assistant", SAID[0])]


async def test_no_credit_left_is_exit_3_after_one_attempt(tmp_path: Path) -> None:
    async with live_backend("live_error=credit_balance_exhausted") as (url, heard):
        r = await replay(url, tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert len(heard.sessions) == 1 and not heard.invalid  # no retry can help
    [line] = [x for x in err.splitlines() if x.startswith("r2d2voice: error:")]
    assert "credit balance is exhausted" in line and "credit_balance_exhausted" in line
    assert "Traceback" not in err
    con = sqlite3.connect(tmp_path / "c.db")
    sessions = con.execute("SELECT backend, model, voice FROM sessions").fetchall()
    errors = con.execute("SELECT code FROM errors WHERE source = 'service'").fetchall()
    con.close()
    assert sessions == [("live", "gpt-live-1", "marin")]  # as planned: no session started
    assert errors == [("credit_balance_exhausted",)]


async def test_the_embedded_backend_speaks_live_with_local_protocol_live(
        tmp_path: Path) -> None:
    """``--backend local`` with ``R2D2_LOCAL_PROTOCOL=live``: offline, no URL, no key."""
    r = await cli("replay", str(TWO_TURNS), "--backend", "local", "--db", str(tmp_path / "c.db"),
                  cwd=tmp_path, env=clean_env(HOME=str(tmp_path), R2D2_LOCAL_PROTOCOL="live"))
    assert r.returncode == 0, r.stderr.decode()
    rows = stored(tmp_path / "c.db")
    assert [(r["role"], r["item_id"].rsplit("_", 1)[0]) for r in rows] == [
        ("user", "live_user"), ("assistant", "live_r2"), ("user", "live_user"),
        ("assistant", "live_r2")]  # the Live core's stretches, not Realtime items
    assert said(rows)[0] == ("user", "(speech, 1.8 s)")
    report = json.loads((await cli("usage", "--db", str(tmp_path / "c.db"), "--format", "json",
                                   cwd=tmp_path)).stdout)
    assert report["total"]["local_live_seconds"] >= 7 and report["total"]["cost_usd"] == 0


@pytest.mark.parametrize("env", [{"R2D2_BACKEND": "live", "R2D2_ECHO": "half"},
                                 {"R2D2_BACKEND": "local", "R2D2_LOCAL_PROTOCOL": "live",
                                  "R2D2_ECHO": "half"}])
async def test_run_refuses_a_full_duplex_model_behind_the_half_duplex_gate(
        tmp_path: Path, env: dict[str, str]) -> None:
    """R2D2_ECHO=half with GPT-Live: exit 3, saying why, before any device or connection;
    ``replay`` (a file, no gate) is not concerned."""
    r = await cli("run", "--url", "ws://127.0.0.1:9/v1/live/sessions", "--db",
                  str(tmp_path / "c.db"), cwd=tmp_path, env=clean_env(HOME=str(tmp_path), **env))
    err = r.stderr.decode()
    assert r.returncode == 3, err
    [line] = err.splitlines()  # no device looked for: one line
    assert line.startswith("r2d2voice: error: R2D2_ECHO=half (in the environment)")
    assert "can never be interrupted" in line and "R2D2_ECHO=aec" in line


def test_backend_live_plans_the_live_service() -> None:
    from r2d2voice.appliance.endpoints import LIVE, plan_service
    from r2d2voice.errors import ConfigError
    from r2d2voice.system.config import Settings

    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):  # OpenAI's own host needs it
        plan_service(Settings(db="x", backend="live"))
    service = plan_service(Settings(db="x", backend="live", api_key="sk-x", live_voice="cedar"))
    assert (service.backend, service.model, service.voice, service.protocol) == (
        "live", "gpt-live-1", "cedar", LIVE)
    assert service.endpoint is not None
    assert service.endpoint.full_url == "wss://api.openai.com/v1/live/sessions"  # no ?model=
    assert service.endpoint.headers() == [("Authorization", "Bearer sk-x")]
    local = plan_service(Settings(db="x", backend="live"), "ws://127.0.0.1:8765/v1/live/sessions")
    assert local.endpoint is not None and local.endpoint.api_key is None
