"""The ``usage`` and ``stats`` reports: exact totals, costs, percentiles, filters, bad input,
and usage totals that match what the (local) service reported."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from storage_support import DAY1, add_local_session, add_wake_sessions, write_report_db

from r2d2voice.cli.main import main
from r2d2voice.localbackend import reply
from r2d2voice.localbackend import server as localserver
from r2d2voice.reports.budget import response_cost
from r2d2voice.reports.stats import percentile, stats_command
from r2d2voice.reports.usage import Prices, usage_command
from r2d2voice.storage.database import Store

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "samples" / "two_turns.wav"


# Costs by hand, default prices (USD/1M): text in 4, cached 0.40; audio in 32, cached 0.40;
# text out 16; audio out 64. Cached input is split per response in text:audio proportion.
# r1: 100 text + 300 audio in, 200 cached -> 50 text + 150 audio cached
R1 = (50 * 4 + 50 * 0.4 + 150 * 32 + 150 * 0.4 + 10 * 16 + 500 * 64) / 1e6  # 0.03724
R2 = (100 * 32 + 5 * 16 + 50 * 64) / 1e6  # 0.00648
R3 = (40 * 0.4 + 8 * 16 + 120 * 64) / 1e6  # all 40 text input cached: 0.007824
R5 = (60 * 4 + 140 * 32 + 20 * 16 + 200 * 64) / 1e6  # 0.01784


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Session a on day 1, b and c (continuing b) on day 2, with known usage/latency/stats."""
    path = tmp_path / "r2.db"
    return path, write_report_db(path)


def report_of(fn: Any, path: Path, **kw: Any) -> dict[str, Any]:
    return fn(path, out=io.StringIO(), fmt="json", **kw)


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``r2d2voice`` in-process with an empty env file (no ./.env or ~/.r2d2/.env)."""
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args], env=env)


# ---------------------------------------------------------------------------- usage


def test_usage_totals_per_day_and_session_with_default_prices(db, tmp_path: Path) -> None:
    path, ids = db
    result = cli(tmp_path, "usage", "--db", str(path), "--format", "json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert [d["day"] for d in rep["days"]] == ["2025-11-20", "2025-11-21"]
    assert [s["session_id"] for s in rep["sessions"]] == [ids["a"], ids["b"], ids["c"]]
    day1, day2 = rep["days"]
    assert {k: day1[k] for k in day1 if k not in ("day", "cost_usd")} == {
        "responses": 2, "input_text": 100, "input_audio": 400, "input_cached": 200,
        "output_text": 15, "output_audio": 550, "local_responses": 0, "live_seconds": 0.0,
        "local_live_seconds": 0.0,
    }  # fmt: skip
    assert day2["responses"] == 3  # the failed response with no usage still counts
    assert (day2["input_text"], day2["input_audio"], day2["input_cached"]) == (100, 140, 40)
    assert day1["cost_usd"] == pytest.approx(R1 + R2, abs=1e-12)
    assert day2["cost_usd"] == pytest.approx(R3 + R5, abs=1e-12)
    costs = [s["cost_usd"] for s in rep["sessions"]]
    assert costs == pytest.approx([R1 + R2, R3, R5], abs=1e-12)
    total = rep["total"]
    assert total == {
        "responses": 5, "input_text": 200, "input_audio": 540, "input_cached": 240,
        "output_text": 43, "output_audio": 870, "cost_usd": pytest.approx(0.069384, abs=1e-12),
        "local_responses": 0, "live_seconds": 0.0, "local_live_seconds": 0.0,
    }  # fmt: skip
    assert rep["prices_usd_per_million"] == {
        "audio_in": 32.0, "audio_in_cached": 0.4, "text_in": 4.0, "text_in_cached": 0.4,
        "audio_out": 64.0, "text_out": 16.0,
    }  # fmt: skip


def test_usage_text_table(db, tmp_path: Path) -> None:
    path, ids = db
    result = cli(tmp_path, "usage", "--db", str(path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Token usage by day (UTC)"
    assert lines[1].split() == ["DAY", "RESPONSES", "IN", "TEXT", "IN", "AUDIO", "IN", "CACHED",
                                "OUT", "TEXT", "OUT", "AUDIO", "COST", "USD"]  # fmt: skip
    assert lines[2].split() == ["2025-11-20", "2", "100", "400", "200", "15", "550", "0.0437"]
    assert lines[3].split() == ["2025-11-21", "3", "100", "140", "40", "28", "320", "0.0257"]
    assert lines[4].split() == ["TOTAL", "5", "200", "540", "240", "43", "870", "0.0694"]
    by_session = lines[lines.index("Token usage by session") + 2:]
    assert by_session[0].split() == [ids["a"], "2", "100", "400", "200", "15", "550", "0.0437"]
    assert by_session[3].split()[0] == "TOTAL"
    assert "text in 4.00 (cached 0.40)" in result.stdout
    assert "in proportion to each response's input" in result.stdout


def test_local_backend_sessions_show_their_tokens_but_cost_nothing(db, tmp_path: Path) -> None:
    path, ids = db
    local = add_local_session(path)  # r6 on day 2: 10 text + 200 audio in, 5 + 300 out
    rep = report_of(usage_command, path)
    day1, day2 = rep["days"]
    assert (day1["responses"], day1["local_responses"]) == (2, 0)
    assert (day2["responses"], day2["local_responses"]) == (4, 1)  # r3, r4, r5 and r6
    assert (day2["input_text"], day2["input_audio"], day2["output_audio"]) == (110, 340, 620)
    assert day2["cost_usd"] == pytest.approx(R3 + R5, abs=1e-12)  # r6 priced at 0
    by_session = {s["session_id"]: s for s in rep["sessions"]}
    assert list(by_session) == [ids["a"], ids["b"], ids["c"], local]  # in session order
    assert {k: by_session[local][k] for k in ("responses", "input_audio", "output_audio",
                                              "cost_usd", "local_responses")} == {
        "responses": 1, "input_audio": 200, "output_audio": 300, "cost_usd": 0,
        "local_responses": 1}  # fmt: skip
    assert by_session[ids["c"]]["local_responses"] == 0
    assert rep["total"]["cost_usd"] == pytest.approx(0.069384, abs=1e-12)
    assert (rep["total"]["responses"], rep["total"]["local_responses"]) == (6, 1)
    # The text marks what was not billed, whole rows and shares of a day.
    lines = cli(tmp_path, "usage", "--db", str(path)).stdout.splitlines()
    assert lines[1].split()[-1] == "NOTE"
    assert lines[2].split() == ["2025-11-20", "2", "100", "400", "200", "15", "550", "0.0437"]
    assert lines[3].endswith("0.0257  1 of them local backend: not billed")
    [row] = [line for line in lines if line.startswith(local)]
    assert row.split()[1:8] == ["1", "10", "200", "0", "5", "300", "0.0000"]
    assert row.endswith("  local backend: not billed")
    assert any(line.startswith("Responses of sessions on the local backend") for line in lines)


def test_usage_prices_from_settings_override_the_defaults(db) -> None:
    path, _ = db
    settings = SimpleNamespace(price_audio_in=10.0, price_text_out=1.5, price_text_in=None)
    rep = report_of(usage_command, path, settings=settings)
    assert rep["prices_usd_per_million"]["audio_in"] == 10.0
    assert rep["prices_usd_per_million"]["text_in"] == 4.0  # None: the default
    # uncached audio in: 150 (r1) + 100 (r2) + 140 (r5) = 390; text out 43
    delta = 390 * (10.0 - 32.0) + 43 * (1.5 - 16.0)
    assert rep["total"]["cost_usd"] == pytest.approx(0.069384 + delta / 1e6, abs=1e-12)


def test_usage_prices_from_environment(db, tmp_path: Path) -> None:
    path, _ = db
    env = {"R2D2_PRICE_AUDIO_IN": "10", "R2D2_PRICE_TEXT_OUT": "1.5"}
    result = cli(tmp_path, "usage", "--db", str(path), "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    delta = 390 * (10.0 - 32.0) + 43 * (1.5 - 16.0)
    cost = json.loads(result.stdout)["total"]["cost_usd"]
    assert cost == pytest.approx(0.069384 + delta / 1e6, abs=1e-12)


def test_bad_price_is_a_usage_error() -> None:
    from r2d2voice.errors import UsageError

    with pytest.raises(UsageError, match="price_text_in"):
        Prices.from_settings(SimpleNamespace(price_text_in=-1.0))


def test_usage_filters(db, tmp_path: Path) -> None:
    path, ids = db
    rep = report_of(usage_command, path, since="2025-11-21")
    assert [d["day"] for d in rep["days"]] == ["2025-11-21"]
    assert rep["total"]["responses"] == 3
    rep = report_of(usage_command, path, until="2025-11-20")  # a date covers that whole day
    assert [s["session_id"] for s in rep["sessions"]] == [ids["a"]]
    rep = report_of(usage_command, path, sessions=[ids["c"], ids["a"]])
    assert [s["session_id"] for s in rep["sessions"]] == [ids["a"], ids["c"]]
    assert rep["total"]["cost_usd"] == pytest.approx(R1 + R2 + R5, abs=1e-12)
    # only r2 was created after 09:30:10 on day 1
    rep = report_of(usage_command, path, since="2025-11-20T09:30:10Z", until="2025-11-20T23:59:59")
    assert rep["total"]["responses"] == 1
    assert rep["total"]["cost_usd"] == pytest.approx(R2, abs=1e-12)


def test_usage_of_an_empty_selection(db, tmp_path: Path) -> None:
    path, _ = db
    result = cli(tmp_path, "usage", "--db", str(path), "--since", "2030-01-01")
    assert result.exit_code == 0
    assert result.stdout == "no responses recorded in the selection\n"
    rep = report_of(usage_command, path, since="2030-01-01")
    assert rep["days"] == rep["sessions"] == []
    assert rep["total"]["responses"] == 0 and rep["total"]["cost_usd"] == 0


@pytest.mark.parametrize("command", ["usage", "stats"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--session", "nope"], "no session 'nope'"),
        (["--since", "yesterday"], "--since: 'yesterday' is not an ISO 8601"),
        (["--since", "2025-11-21", "--until", "2025-11-20"], "is not after --since"),
        (["--format", "xml"], "Invalid value for '--format'"),
    ],
)
def test_bad_options_exit_2_with_one_line(db, tmp_path: Path, command, args, message) -> None:
    path, _ = db
    result = cli(tmp_path, command, "--db", str(path), *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["usage", "stats"])
def test_missing_database_exits_2_and_creates_nothing(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "none.db"
    result = cli(tmp_path, command, "--db", str(missing))
    assert result.exit_code == 2
    assert result.stderr == f"r2d2voice: error: no such database: {missing}\n"
    assert not missing.exists()


# ---------------------------------------------------------------------------- stats


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert [percentile([10, 20, 30], p) for p in (50, 90, 99)] == [20, 30, 30]
    assert percentile([7], 50) == 7
    assert percentile(list(range(10, 101, 10)), 90) == 90  # rank exactly 9, not 10
    assert percentile([], 50) is None


def test_stats_report(db, tmp_path: Path) -> None:
    path, _ = db
    result = cli(tmp_path, "stats", "--db", str(path), "--format", "json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["sessions"] == 3 and rep["sessions_with_stats"] == 2
    assert rep["responses"] == {"total": 5,
                                "by_status": {"cancelled": 1, "completed": 3, "failed": 1}}
    lat = rep["latency_ms"]
    assert lat["percentile_method"] == "nearest-rank"
    # received: 100 200 300 500; played: 150 260 350
    assert lat["speech_stopped_to_first_audio_received"] == {
        "n": 4, "p50": 200, "p90": 500, "p99": 500}
    assert lat["speech_stopped_to_first_audio_played"] == {
        "n": 3, "p50": 260, "p90": 350, "p99": 350}
    assert rep["interrupted_replies"] == 1
    assert rep["errors"] == {"service": 1, "local": 0}
    assert rep["counters"] == {
        "frames_dropped": 5, "audio_chunks_dropped": None, "underruns": 1, "reconnects": 1,
        "interruptions": 1, "junk_messages": 0, "service_errors": 1, "frames_gated": 40,
        "custom": 5,
    }  # fmt: skip
    assert rep["reconnects"] == {"count": 1, "source": "counter"}
    assert rep["sessions_continuing_earlier"] == 1
    assert rep["tools"] == {"calls": 4, "by_tool": {
        "get_time": {"ok": 1}, "turn_head": {"ok": 1, "running": 1, "timeout": 1}}}


def test_stats_text(db, tmp_path: Path) -> None:
    path, _ = db
    result = cli(tmp_path, "stats", "--db", str(path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Responses: 5 (cancelled 1, completed 3, failed 1)" in lines
    assert "Latency from speech stopped, ms (nearest-rank percentiles)" in lines
    assert ["first", "reply", "audio", "received", "4", "200", "500", "500"] in [
        line.split() for line in lines]
    assert "Interrupted replies: 1" in lines
    assert "Pipeline counters, summed over 2 of 3 sessions that recorded them:" in lines
    counters = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ")}
    assert counters["frames_dropped"] == "5"
    assert counters["audio_chunks_dropped"] == "n/a"
    assert counters["custom"] == "5"
    assert "Tool calls: 4" in lines
    tools = [line.split() for line in lines]
    assert ["TOOL", "CALLS", "OK", "TIMEOUT", "RUNNING"] in tools
    assert ["turn_head", "3", "1", "1", "1"] in tools and ["get_time", "1", "1", "0", "0"] in tools


def test_stats_filters_and_reconnects_without_the_counter(db) -> None:
    path, ids = db
    rep = report_of(stats_command, path, sessions=[ids["c"]])
    assert rep["sessions"] == 1 and rep["sessions_with_stats"] == 0
    assert rep["responses"]["by_status"] == {"completed": 1}
    assert rep["latency_ms"]["speech_stopped_to_first_audio_played"]["p50"] == 150
    assert set(rep["counters"].values()) == {None}
    # no counter recorded: reconnects = sessions continuing an earlier one (c continues b)
    assert rep["reconnects"] == {"count": 1, "source": "previous_session_id"}
    rep = report_of(stats_command, path, since="2025-11-21")
    assert rep["sessions"] == 2 and rep["responses"]["total"] == 3
    assert rep["tools"]["by_tool"] == {"get_time": {"ok": 1}, "turn_head": {"running": 1}}
    assert rep["interrupted_replies"] == 0  # the interruption was on day 1
    assert rep["counters"]["frames_dropped"] == 2
    rep = report_of(stats_command, path, until="2025-11-20")
    assert rep["reconnects"] == {"count": 0, "source": "counter"}


def test_stats_with_no_data_says_n_a(tmp_path: Path) -> None:
    path = tmp_path / "r2.db"
    with Store.open(path, now=lambda: DAY1) as s:
        s.write.start_session(backend="local", model="m", voice=None)
    result = cli(tmp_path, "stats", "--db", str(path))
    assert result.exit_code == 0, result.output
    assert ["first", "reply", "audio", "played", "0", "n/a", "n/a", "n/a"] in [
        line.split() for line in result.stdout.splitlines()]
    assert "reconnects            0 (not counted by the pipeline" in result.stdout
    assert "Tool calls: 0" in result.stdout.splitlines()


def test_set_session_stats_merges_into_metadata(db) -> None:
    path, ids = db
    def metadata(sid: str) -> Any:
        row = s.conn.execute("SELECT metadata FROM sessions WHERE id = ?", (sid,)).fetchone()
        return json.loads(row[0])

    with Store.open(path) as s:
        assert metadata(ids["a"]) == {"command": "run", "stats": {
            "frames_dropped": 3, "underruns": 1, "reconnects": 0, "interruptions": 1,
            "junk_messages": 0}}  # fmt: skip
        before = s.conn.execute("SELECT id, metadata FROM sessions ORDER BY seq").fetchall()
        s.write.set_session_stats("no-such-session", {"underruns": 1})  # changes nothing
        assert s.conn.execute("SELECT id, metadata FROM sessions ORDER BY seq").fetchall() \
            == before
        s.write.set_session_stats(ids["a"], {"underruns": 9})  # replaces the earlier stats
        rows = {r.session_id: r for r in s.read.session_stats()}
        assert rows[ids["a"]].stats == {"underruns": 9}
        assert rows[ids["c"]].stats is None
        assert metadata(ids["a"])["command"] == "run"
        with pytest.raises(TypeError):
            s.write.set_session_stats(ids["a"], {"bad": object()})
        assert metadata(ids["a"])["stats"] == {"underruns": 9}  # the failed call wrote nothing
        s.conn.execute("UPDATE sessions SET metadata = '[1, 2]' WHERE id = ?", (ids["c"],))
        s.write.set_session_stats(ids["c"], {"underruns": 2})  # not an object: replaced
        assert metadata(ids["c"]) == {"stats": {"underruns": 2}}


# ---------------------------------------------------------------------------- end to end


async def test_usage_totals_match_what_the_service_reported(tmp_path: Path, monkeypatch) -> None:
    """A real replay against the local backend: ``usage`` totals equal the usage the backend
    put in its ``response.done`` events."""
    reported: list[dict[str, Any]] = []
    closing = reply.Reply.closing

    def spy(self: Any) -> list[Any]:
        events = closing(self)
        reported.extend(e["response"]["usage"] for e in events if e["type"] == "response.done")
        return events

    monkeypatch.setattr(reply.Reply, "closing", spy)
    db = tmp_path / "r2.db"
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("R2D2_DB", None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(localserver.serve_local, "127.0.0.1", 0,
                                   localserver.BackendConfig(realtime_factor=10.0))
        proc = await trio.run_process(
            [sys.executable, "-m", "r2d2voice", "replay", str(SAMPLE), "--backend", "local",
             "--url", f"ws://127.0.0.1:{port}/v1/realtime", "--db", str(db),
             "--out", str(tmp_path / "reply.wav")],
            cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"2 turns answered" in proc.stdout
    assert len(reported) == 2

    def summed(detail: str, kind: str) -> int:
        return sum(u[detail][kind] for u in reported)

    expected = {
        "responses": len(reported),
        "input_text": summed("input_token_details", "text_tokens"),
        "input_audio": summed("input_token_details", "audio_tokens"),
        "input_cached": summed("input_token_details", "cached_tokens"),
        "output_text": summed("output_token_details", "text_tokens"),
        "output_audio": summed("output_token_details", "audio_tokens"),
    }
    assert expected["input_audio"] > 0 and expected["output_audio"] > 0
    assert sum(u["input_tokens"] for u in reported) == (
        expected["input_text"] + expected["input_audio"])
    result = cli(tmp_path, "usage", "--db", str(db), "--format", "json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    total = rep["total"]
    assert {k: total[k] for k in expected} == expected
    assert [s["responses"] for s in rep["sessions"]] == [2]
    # the second response read the first one's input again, from the cache
    assert expected["input_cached"] == reported[0]["input_tokens"] > 0
    # No service bills the local backend: its tokens are shown, priced at 0 and marked.
    assert total["cost_usd"] == 0 and total["local_responses"] == 2
    assert [(s["cost_usd"], s["local_responses"]) for s in rep["sessions"]] == [(0, 2)]
    text = cli(tmp_path, "usage", "--db", str(db)).stdout.splitlines()
    assert text[1].split()[-1] == "NOTE"
    assert text[2].endswith("0.0000  local backend: not billed")
    # Priced as if billed (R2D2_BILL_LOCAL): what the budget counts for each response as it
    # comes is what usage shows from the record; cached input at the cached price.
    billed = json.loads(cli(tmp_path, "usage", "--db", str(db), "--format", "json",
                            env={"R2D2_BILL_LOCAL": "on"}).stdout)
    per_response = [response_cost(u, Prices()) for u in reported]
    assert billed["total"]["cost_usd"] == pytest.approx(sum(per_response), abs=1e-9)
    assert billed["total"]["local_responses"] == 0 and billed["bill_local"] is True
    full = Prices(audio_in_cached=Prices().audio_in, text_in_cached=Prices().text_in)
    assert per_response[1] < response_cost(reported[1], full)
    stats = json.loads(cli(tmp_path, "stats", "--db", str(db), "--format", "json").stdout)
    assert stats["responses"] == {"total": 2, "by_status": {"completed": 2}}
    assert stats["latency_ms"]["speech_stopped_to_first_audio_received"]["n"] == 2


def test_stats_report_the_wake_word_mode(db, tmp_path: Path) -> None:
    path, _ = db
    assert "wake" not in report_of(stats_command, path)  # no wake sessions: not shown
    assert "Wakes" not in cli(tmp_path, "stats", "--db", str(path)).stdout
    add_wake_sessions(path)
    rep = report_of(stats_command, path)
    assert rep["wake"] == {
        "wakes": 4, "by_source": {"external": 1, "word": 3}, "conversations": 3,
        "wake_to_ready_ms": {"n": 2, "p50": 640, "p90": 812, "max": 812},
        "conversation_s": {"n": 3, "p50": 3.0, "p90": 14.5, "max": 14.5},
        "ends": {"idle": 1, "ended": 1, "no service": 1}}
    text = cli(tmp_path, "stats", "--db", str(path)).stdout
    assert "Wakes: 4 (external 1, word 3)" in text
    assert "Conversations: 3 (ended: idle 1, ended 1, no service 1)" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["wake", "to", "ready,", "ms", "2", "640", "812", "812"] in rows
    assert ["conversation", "length,", "s", "3", "3.0", "14.5", "14.5"] in rows
