"""Prometheus metrics (``R2D2_METRICS``): served over real HTTP on that address only, read back
with prometheus-client's own parser, from a replay in a child process; the server thread stops
with the run; a busy or bad address is one line, exit 3, before anything is sent."""

from __future__ import annotations

import math
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio
from fake_service import fast, realtime
from local_link import LocalLink, inline_threads, talk
from prometheus_client.parser import text_string_to_metric_families
from storage_support import cap_pages, free_space, settled
from support import PRICED, RATE, clean_env, cli, free_port, local_backend, silence, tone

from r2d2voice.appliance.watching import Watching
from r2d2voice.errors import ConfigError
from r2d2voice.link.state import LinkPolicy
from r2d2voice.localbackend.faults import Faults
from r2d2voice.protocol.actions import StoreLatency, StoreMessage, StoreResponse
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.recorder import AsyncStore
from r2d2voice.system.config import Settings
from r2d2voice.system.metrics import Metrics, serve_metrics

NAMES = ("r2d2voice_turns", "r2d2voice_responses", "r2d2voice_reply_latency_seconds",
         "r2d2voice_cost_usd", "r2d2voice_budget_remaining_usd", "r2d2voice_connected",
         "r2d2voice_reconnects", "r2d2voice_store_records_waiting",
         "r2d2voice_capture_dropped_frames", "r2d2voice_playback_underruns",
         "r2d2voice_wakes", "r2d2voice_tool_calls", "r2d2voice_device_present")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return {f.name for f in text_string_to_metric_families(response.read().decode())}


async def test_every_metric_is_served_on_that_address_only(tmp_path: Path) -> None:
    m = Metrics()
    for record in (StoreMessage("user", "u1", 1, "hi"),
                   StoreMessage("user", "u2", 3, "h", partial=True),
                   StoreResponse("r1", "in_progress"), StoreResponse("r1", "completed", {}),
                   StoreResponse("r2", "cancelled"), StoreLatency("r1", 820.0),
                   StoreToolCall("c1", "fc1", "r1", 2, "turn_head", "{}"),
                   StoreToolResult("c1", "ok")):
        m.observe(record)
    m.cost(0.25)
    m.budget_remaining(0.75)
    m.connected(True)
    m.reconnect("lost")
    m.store_waiting(3)
    m.capture_dropped(5)
    m.capture_dropped(4)  # a total that went down: the counter stays
    m.capture_dropped(7)
    m.underruns(2)
    m.wake("word")
    m.device_present("input", True)
    m.device_present("output", False)
    port = free_port()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_metrics, f"127.0.0.1:{port}", m)
        assert url == f"http://127.0.0.1:{port}/metrics"
        got = await trio.to_thread.run_sync(scrape, url)
        names = await trio.to_thread.run_sync(families, url)
        # bound to 127.0.0.1 only: another loopback address of this machine is refused
        with pytest.raises(ConnectionRefusedError), socket.create_connection(
                ("127.0.0.2", port), timeout=2):
            pass
        nursery.cancel_scope.cancel()
    assert set(NAMES) <= names and "process_resident_memory_bytes" in names

    def value(metric: str, **labels: str) -> float:
        return got[(metric, tuple(sorted(labels.items())))]

    assert value("r2d2voice_turns_total") == 1  # a partial transcript is no turn
    assert value("r2d2voice_responses_total", status="completed") == 1
    assert value("r2d2voice_responses_total", status="cancelled") == 1
    assert ("r2d2voice_responses_total", (("status", "in_progress"),)) not in got
    assert value("r2d2voice_reply_latency_seconds_count") == 1
    assert value("r2d2voice_reply_latency_seconds_sum") == 0.82
    assert value("r2d2voice_reply_latency_seconds_bucket", le="0.75") == 0
    assert value("r2d2voice_reply_latency_seconds_bucket", le="1.0") == 1
    assert value("r2d2voice_cost_usd_total") == 0.25
    assert value("r2d2voice_budget_remaining_usd") == 0.75
    assert value("r2d2voice_connected") == 1
    assert value("r2d2voice_reconnects_total", reason="lost") == 1
    assert value("r2d2voice_store_records_waiting") == 3
    assert value("r2d2voice_capture_dropped_frames_total") == 7
    assert value("r2d2voice_playback_underruns_total") == 2
    assert value("r2d2voice_wakes_total", source="word") == 1
    assert value("r2d2voice_tool_calls_total", name="turn_head", status="ok") == 1
    assert value("r2d2voice_device_present", kind="input") == 1
    assert value("r2d2voice_device_present", kind="output") == 0
    # on the way out the server stopped: its thread is gone and the port is free again
    assert not [t for t in threading.enumerate() if "serve_forever" in t.name]
    with socket.socket() as s:  # (SO_REUSEADDR: the scrapes' connections are in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


async def test_no_budget_cap_is_an_infinite_remainder() -> None:
    m = Metrics(process=False)
    port = free_port()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_metrics, f"127.0.0.1:{port}", m)
        got = await trio.to_thread.run_sync(scrape, url)
        nursery.cancel_scope.cancel()
    assert math.isinf(got[("r2d2voice_budget_remaining_usd", ())])


async def test_a_busy_or_foreign_address_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="already in use"):
            await serve_metrics(f"127.0.0.1:{port}", Metrics(process=False))
    with pytest.raises(ConfigError, match="not an address of this machine"):
        await serve_metrics("192.0.2.1:9464", Metrics(process=False))  # TEST-NET-1


@pytest.mark.parametrize(("faults", "reason"), [
    (Faults(close_after_responses=1), "lost"),  # 1011 after the reply: a lost link
    (Faults(expire_after_responses=1), "expired"),  # the service's session_expired
])
async def test_reconnects_are_counted_by_how_the_replaced_connection_ended(
        autojump_clock, monkeypatch: pytest.MonkeyPatch, faults: Faults, reason: str) -> None:
    """The supervisor's connections as the metrics see them (LinkParts.on_connection): each
    session replacing one the service ended counts, labelled with the real EndReason."""
    inline_threads(monkeypatch)
    metrics = Metrics(process=False)
    watching = Watching(Settings(backend="local"), metrics=metrics)
    link = LocalLink(faults=faults)
    result, _ = await talk(link, fast(1.0, 1.5, 1.0, 1.5), on_record=watching.on_record,
                           on_connection=watching.on_connection,
                           policy=LinkPolicy(backoff_initial=0.1))
    sample = metrics.registry.get_sample_value
    assert link.connections == 3 and result.stats.reconnects == 2  # a reconnect per reply
    assert sample("r2d2voice_reconnects_total", {"reason": reason}) == 2
    assert sample("r2d2voice_connected") == 0  # the run is over
    assert sample("r2d2voice_turns_total") == 2
    assert sample("r2d2voice_responses_total", {"status": "completed"}) == 2


async def test_a_recycled_connection_is_a_reconnect_of_its_own_kind(
        autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    inline_threads(monkeypatch)
    metrics = Metrics(process=False)
    watching = Watching(Settings(backend="local"), metrics=metrics)
    link = LocalLink()
    await talk(link, realtime(1.0, 4.0, 1.0, 3.0), on_connection=watching.on_connection,
               policy=LinkPolicy(session_max_seconds=3.0))
    assert link.connections >= 2
    assert metrics.registry.get_sample_value(
        "r2d2voice_reconnects_total", {"reason": "recycle"}) == link.connections - 1


async def test_records_waiting_count_only_while_the_database_cannot_be_written(
        tmp_path: Path, autojump_clock) -> None:
    """A full database (SQLite's own SQLITE_FULL): what waits in memory is the gauge; a
    write merely in progress is not."""
    metrics = Metrics(process=False)
    watching = Watching(Settings(backend="local"), metrics=metrics)
    store = watching.store = await AsyncStore.open(tmp_path / "r2.db")

    def waiting() -> float | None:
        watching.sample()
        return metrics.registry.get_sample_value("r2d2voice_store_records_waiting")

    sid = await store.start_session(backend="local", model="m", voice=None)
    assert waiting() == 0
    await cap_pages(store)
    for i in range(3):
        await store.record(sid, [StoreMessage("user", f"u{i}", i, "x" * 6000)])
    assert store.status.state == "waiting" and waiting() == 3
    await free_space(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        await settled(store)
        nursery.cancel_scope.cancel()
    assert waiting() == 0
    await store.aclose()


def three_turns(path: Path) -> None:
    parts = [silence(0.5)]
    for k in range(3):
        parts += [tone(0.8, freq=330.0 + 70 * k), silence(1.5)]
    sf.write(path, np.concatenate(parts), RATE)




async def test_a_replay_serves_its_metrics_while_it_talks(tmp_path: Path) -> None:
    wav, db = tmp_path / "talk.wav", tmp_path / "r2.db"
    three_turns(wav)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = clean_env(HOME=str(tmp_path), R2D2_METRICS=f"127.0.0.1:{port}",
                    R2D2_BUDGET_DAILY_USD="10", **PRICED)
    seen: dict[Any, float] = {}
    async with local_backend(realtime_factor=20) as ws, trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "r2d2voice", "replay", str(wav), "--speed", "realtime",
             "--backend", "local", "--url", ws, "--db", str(db)],
            cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
            task_status=task_status))
        completed = ("r2d2voice_responses_total", (("status", "completed"),))
        with trio.fail_after(30):  # scrape until the first turn is answered and heard
            while (seen.get(("r2d2voice_reply_latency_seconds_count", ()), 0) < 1
                   or seen.get(completed, 0) < 1):
                assert proc.returncode is None, proc.stderr  # it ended before a turn
                await trio.sleep(0.1)
                try:
                    seen = await trio.to_thread.run_sync(scrape, url)
                except OSError:
                    continue  # not serving yet
        with trio.fail_after(30):
            await proc.wait()
    assert proc.returncode == 0, proc.stderr
    assert seen[("r2d2voice_turns_total", ())] >= 1
    assert seen[("r2d2voice_connected", ())] == 1
    cost = seen[("r2d2voice_cost_usd_total", ())]
    assert cost >= 0.1 and round(cost * 10, 6) == round(cost * 10)  # $0.10 a reply
    assert seen[("r2d2voice_budget_remaining_usd", ())] == pytest.approx(10 - cost)
    assert seen[("r2d2voice_store_records_waiting", ())] == 0
    assert seen[("r2d2voice_capture_dropped_frames_total", ())] == 0
    # the run is over: nothing listens there any more
    with pytest.raises(OSError):
        await trio.to_thread.run_sync(scrape, url)


@pytest.mark.parametrize("setting", ["busy", "9464", "nohost:99999"])
async def test_a_bad_metrics_address_stops_the_replay_before_it_connects(
        tmp_path: Path, setting: str) -> None:
    wav = tmp_path / "talk.wav"
    three_turns(wav)
    heard: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}" if setting == "busy" else setting
        async with local_backend(observer=lambda sid, _: heard.append(sid)) as ws:
            r = await cli("replay", str(wav), "--backend", "local", "--url", ws, "--db",
                          str(tmp_path / "r2.db"), cwd=tmp_path,
                          env=clean_env(HOME=str(tmp_path), R2D2_METRICS=address))
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 3, err
    assert len(err) == 1 and err[0].startswith("r2d2voice: error: R2D2_METRICS")
    if setting == "busy":
        assert err[0].endswith("already in use")
    else:
        assert "must be 'off' or HOST:PORT" in err[0]
    assert not heard  # nothing reached the service
