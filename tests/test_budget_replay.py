"""A budget cap stops a replay as a user runs it: ``r2d2voice replay`` in a child process,
talking to the local backend on a loopback port (which sees every client event), priced as if
billed (``R2D2_BILL_LOCAL``) so that each 1 s reply costs exactly $0.10."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from support import PRICED, RATE, clean_env, cli, local_backend, silence, tone

GAP_S = 1.5


def five_turns(path: Path) -> list[int]:
    """A WAV of five 0.8 s turns, 1.5 s apart; where each turn's speech starts (samples)."""
    parts, starts, at = [silence(0.5)], [], RATE // 2
    for k in range(5):
        starts.append(at)
        burst = tone(0.8, freq=330.0 + 70 * k)
        parts += [burst, silence(GAP_S)]
        at += len(burst) + round(GAP_S * RATE)
    sf.write(path, np.concatenate(parts), RATE)
    return starts


class Heard:
    """What the local backend received: sessions opened, audio samples appended."""

    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.samples = 0

    def __call__(self, session_id: str, event: dict[str, Any]) -> None:
        self.sessions.add(session_id)
        if event.get("type") == "input_audio_buffer.append":
            self.samples += len(base64.b64decode(event["audio"])) // 2


def stored(db: Path) -> tuple[int, int]:
    """(user messages, completed responses) in the database."""
    con = sqlite3.connect(db)
    users = con.execute("SELECT count(*) FROM messages WHERE role = 'user'").fetchone()[0]
    done = con.execute("SELECT count(*) FROM responses WHERE status = 'completed'").fetchone()[0]
    con.close()
    return users, done


async def replay(tmp_path: Path, wav: Path, url: str, db: Path, cap: str) -> Any:
    env = clean_env(HOME=str(tmp_path), R2D2_BUDGET_DAILY_USD=cap, **PRICED)
    return await cli("replay", str(wav), "--backend", "local", "--url", url, "--db", str(db),
                     cwd=tmp_path, env=env)


async def test_the_cap_stops_the_replay_and_the_spend_survives_a_restart(tmp_path: Path) -> None:
    wav, db = tmp_path / "talk.wav", tmp_path / "r2.db"
    starts = five_turns(wav)
    heard = Heard()
    async with local_backend(realtime_factor=20, observer=heard) as url:
        # $0.25 a day: the third reply ($0.30) reaches it; the fourth turn is never sent
        r = await replay(tmp_path, wav, url, db, "0.25")
        out, err = r.stdout.decode(), r.stderr.decode()
        assert r.returncode == 1, err
        assert err.splitlines()[-1] == ("r2d2voice: error: stopped: daily budget of $0.25 "
                                        "reached after 3 turns; what was said is stored")
        assert err.count("daily budget: $0.20 of $0.25 spent (80%)") == 1  # one warning
        assert out.count("r2: ") == 3 and "3 turns answered" in out
        assert stored(db) == (3, 3)
        assert heard.samples < starts[3]  # not one sample of the fourth turn reached it
        assert len(heard.sessions) == 1

        # The same day, the same cap: exit 1 before connecting (nothing reaches the service)
        heard.sessions.clear()
        r = await replay(tmp_path, wav, url, db, "0.25")
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert err.strip().splitlines() == [
            "r2d2voice: error: daily budget of $0.25 already reached ($0.30 spent today): "
            "nothing was sent; back tomorrow"]
        assert r.stdout == b"" and not heard.sessions and stored(db) == (3, 3)

        # A restart with the cap raised to $0.45: the $0.30 already spent still counts, so
        # two more replies ($0.50) reach it
        r = await replay(tmp_path, wav, url, db, "0.45")
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert err.splitlines()[-1] == ("r2d2voice: error: stopped: daily budget of $0.45 "
                                        "reached after 2 turns; what was said is stored")
        assert stored(db) == (5, 5)

    result = await cli("usage", "--db", str(db), "--format", "json", cwd=tmp_path,
                       env=clean_env(HOME=str(tmp_path), R2D2_BUDGET_DAILY_USD="0.45", **PRICED))

    budget = json.loads(result.stdout)["budget"]["daily"]
    assert (budget["spent_usd"], budget["cap_usd"], budget["reached"]) == (0.5, 0.45, True)


async def test_unbilled_the_replay_goes_to_its_end_with_its_context_bounded(
        tmp_path: Path) -> None:
    wav, db = tmp_path / "talk.wav", tmp_path / "r2.db"
    five_turns(wav)
    sessions: list[dict[str, Any]] = []

    def observe(_: str, event: dict[str, Any]) -> None:
        if event.get("type") == "session.update":
            sessions.append(event["session"])

    async with local_backend(realtime_factor=20, observer=observe) as url:
        # the local backend is not billed unless R2D2_BILL_LOCAL says so: a cap never bites
        env = clean_env(HOME=str(tmp_path), R2D2_BUDGET_DAILY_USD="0.01",
                        R2D2_MAX_OUTPUT_TOKENS="300", R2D2_CONTEXT_TOKEN_LIMIT="4000",
                        R2D2_TRUNCATION_RATIO="0.5")
        r = await cli("replay", str(wav), "--backend", "local", "--url", url, "--db", str(db),
                      cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert "5 turns answered" in r.stdout.decode() and stored(db) == (5, 5)
    # the reply's length and the context are bounded as configured
    [session] = sessions
    assert session["max_output_tokens"] == 300
    assert session["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.5,
                                     "token_limits": {"post_instructions": 4000}}
