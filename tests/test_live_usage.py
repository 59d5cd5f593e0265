"""What GPT-Live sessions cost: their billed seconds (the service's total, never a sum of its
updates) priced per minute, plus their delegated model's tokens — in ``usage`` (text and JSON)
and left out of the response counts of ``usage`` and ``stats``. The sessions are written by
the Live core's own records through the recorder's mapping into a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from storage_support import LIVE_SECONDS, LIVE_TOKENS, add_live_session, write_report_db

from r2d2voice.cli.main import main

TOKENS_USD = (LIVE_TOKENS[0] * 4 + LIVE_TOKENS[1] * 16) / 1e6  # at the text prices


def report(tmp_path: Path, *args: str, **env: str) -> Any:
    env_file = tmp_path / "empty.env"
    env_file.touch()
    result = CliRunner().invoke(main, ["--env-file", str(env_file), *args], env=env or None)
    assert result.exit_code == 0, result.output
    return result


def usage_json(tmp_path: Path, db: Path, **env: str) -> dict[str, Any]:
    return json.loads(report(tmp_path, "usage", "--db", str(db), "--format", "json",
                             **env).stdout)


def test_a_live_session_costs_its_billed_minutes_and_its_delegated_tokens(tmp_path: Path):
    db = tmp_path / "r2.db"
    sid = add_live_session(db)
    rep = usage_json(tmp_path, db)
    (session,) = rep["sessions"]
    assert session["session_id"] == sid
    assert session["live_seconds"] == LIVE_SECONDS[-1]  # 45, not 15 + 30 + 45
    assert session["responses"] == 1  # the delegated response; the billed time is no response
    assert (session["input_text"], session["output_text"]) == LIVE_TOKENS
    assert session["cost_usd"] == pytest.approx(45 / 60 * 0.05 + TOKENS_USD, abs=1e-12)
    assert rep["price_live_usd_per_minute"] == 0.05
    assert "live_minute" not in rep["prices_usd_per_million"]
    dearer = usage_json(tmp_path, db, R2D2_PRICE_LIVE_MINUTE="0.10")
    assert dearer["total"]["cost_usd"] == pytest.approx(45 / 60 * 0.10 + TOKENS_USD, abs=1e-12)


def test_the_text_report_shows_the_live_seconds_and_their_price(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    sid = add_live_session(db)
    text = report(tmp_path, "usage", "--db", str(db)).stdout
    lines = text.splitlines()
    assert "LIVE S" in lines[1]
    row = next(line for line in lines if line.startswith(sid)).split()
    assert row[-2:] == ["45", f"{45 / 60 * 0.05 + TOKENS_USD:.4f}"]
    assert "USD 0.05 a minute (R2D2_PRICE_LIVE_MINUTE)" in text


def test_live_and_realtime_sessions_add_up_and_realtime_reports_are_unchanged(tmp_path: Path):
    db = tmp_path / "r2.db"
    write_report_db(db)
    before = usage_json(tmp_path, db)
    assert "LIVE S" not in report(tmp_path, "usage", "--db", str(db)).stdout
    add_live_session(db)
    after = usage_json(tmp_path, db)
    assert after["total"]["responses"] == before["total"]["responses"] + 1
    assert after["total"]["live_seconds"] == 45
    assert after["total"]["cost_usd"] == pytest.approx(
        before["total"]["cost_usd"] + 45 / 60 * 0.05 + TOKENS_USD, abs=1e-12)


def test_a_local_live_session_is_counted_but_not_billed(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    add_live_session(db, backend="local")
    rep = usage_json(tmp_path, db)
    total = rep["total"]
    assert (total["live_seconds"], total["local_live_seconds"], total["cost_usd"]) == (
        45, 45, 0.0)
    text = report(tmp_path, "usage", "--db", str(db)).stdout
    assert "local backend: not billed" in text


def test_stats_counts_responses_not_billed_time(tmp_path: Path) -> None:
    db = tmp_path / "r2.db"
    add_live_session(db)
    stats = json.loads(report(tmp_path, "stats", "--db", str(db), "--format", "json").stdout)
    assert stats["responses"] == {"total": 1, "by_status": {"completed": 1}}
