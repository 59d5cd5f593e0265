"""A full disk never silences the robot: the recorder holds records in memory, retries with
backoff and commits them all, in order, when space returns.

Two ways to fill a disk: SQLite's own SQLITE_FULL through ``PRAGMA max_page_count`` on the
recorder's connection (portable, no privileges), and a real tiny tmpfs filled with a file
(needs root and ``mount``; skipped with the reason elsewhere, never under CI=true).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from storage_support import SteppedClock, cap_pages, free_space, settled
from support import SAMPLES, cli

from r2d2voice.protocol.actions import StoreMessage, StoreResponse
from r2d2voice.reports.export import run_export
from r2d2voice.storage.database import Store
from r2d2voice.storage.health import StoreUnavailable, describe, is_transient
from r2d2voice.storage.pending import PENDING_BOUND, RETRY_MAX, StoreStatus
from r2d2voice.storage.recorder import AsyncStore, open_store
from r2d2voice.storage.timestamps import format_ts

BIG = "x" * 6000  # needs overflow pages: never fits in a page's leftover space


def words(i: int) -> str:
    return f"turn {i} " + BIG


def exported(db: Path) -> list[dict[str, object]]:
    import io

    out = io.StringIO()
    run_export(db, out=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


# ---------------------------------------------------------------------------- SQLITE_FULL


async def test_records_wait_through_a_full_database_and_are_committed_in_order(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    db = tmp_path / "r2.db"
    wall = SteppedClock()
    statuses: list[StoreStatus] = []
    store = await AsyncStore.open(db, now=wall, on_status=statuses.append)
    sid = await store.start_session(backend="local", model="m", voice=None)
    await store.record(sid, [StoreMessage("user", "u1", 1, "before the disk filled")])
    await cap_pages(store)

    # The disk is full: each call returns at once (the conversation goes on), nothing raises.
    for i in range(2, 12):
        wall.step(seconds=1)
        await store.record(sid, [StoreMessage("user", f"u{i}", i, words(i)),
                                 StoreResponse(f"r{i}", "in_progress")])
    wall.step(seconds=1)
    await store.end_session(sid, {"frames_dropped": 0})
    status = store.status
    assert (status.state, status.waiting, status.dropped) == ("waiting", 21, 0)
    assert str(status) == "database full: 21 records waiting"
    assert statuses[0].state == "waiting" and statuses[-1] == status
    with Store.open(db, create=False) as r:
        assert [m.text for m in r.read.iter_messages()] == ["before the disk filled"]

    # Space returns; the next retry (1 s later) writes everything, in order.
    await free_space(store)
    await trio.sleep(0.5)
    assert store.status.state == "waiting"  # not due yet: retries back off
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        await settled(store)
        nursery.cancel_scope.cancel()
    assert store.status.retries == 1
    assert str(store.status) == "database ok" and statuses[-1].state == "ok"
    await store.aclose()
    rows = exported(db)
    assert [r["seq"] for r in rows] == list(range(1, 12))
    assert rows[5]["text"] == words(6)
    # Labels are when each record was recorded, not when the disk let it be written.
    assert rows[5]["created_at"] == format_ts(wall.now.replace(second=5))
    with Store.open(db, create=False) as r:
        session = r.read.get_session(sid)
        assert session.ended_at == format_ts(wall.now)
        assert r.read.session_stats()[0].stats == {"frames_dropped": 0}
        assert r.read.response_status_counts() == {"in_progress": 10}


async def test_beyond_the_bound_records_are_dropped_counted_and_logged(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "r2d2voice.storage.recorder")
    assert PENDING_BOUND == 5000  # the written policy (storage/pending.py)
    db = tmp_path / "r2.db"
    store = await AsyncStore.open(db, bound=4)
    sid = await store.start_session(backend="local", model="m", voice=None)
    await cap_pages(store)
    for i in range(1, 8):
        await store.record(sid, [StoreMessage("user", f"u{i}", i, words(i))])
    # A session end is never dropped: the rows before it need their session.
    await store.end_session(sid)
    assert (store.status.waiting, store.status.dropped) == (5, 3)
    assert str(store.status) == "database full: 5 records waiting, 3 dropped"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[0].startswith("database full: keeping records in memory (at most 4)")
    assert errors[1] == ("database full: 4 records already waiting (the bound); dropping new"
                         " records: 1 dropped so far")
    assert len(errors) == 2  # loud once, not once per record
    await free_space(store)
    await trio.sleep(1)
    await store.record(sid, [StoreMessage("assistant", "a9", 9, "after")])  # a due retry
    assert store.status.state == "ok"
    await store.aclose()
    assert [r["seq"] for r in exported(db)] == [1, 2, 3, 4, 9]
    assert any("writable again" in r.getMessage() and "3 records dropped" in r.getMessage()
               for r in caplog.records)


async def test_retries_back_off_doubling_up_to_a_minute(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    schedule: list[tuple[int, float]] = []
    eighth_failure = trio.Event()

    def watch(status: StoreStatus) -> None:
        if status.next_retry is not None and (status.retries, status.next_retry) not in schedule:
            schedule.append((status.retries, status.next_retry))
        if status.retries == 7:
            eighth_failure.set()

    store = await AsyncStore.open(tmp_path / "r2.db", on_status=watch)
    sid = await store.start_session(backend="local", model="m", voice=None)
    await cap_pages(store)
    t0 = trio.current_time()
    await store.record(sid, [StoreMessage("user", "u1", 1, words(1))])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        await eighth_failure.wait()
        await free_space(store)
        await settled(store)
        nursery.cancel_scope.cancel()
    # Retries at t0 + 1, 3, 7, 15, 31, 63, then every RETRY_MAX = 60 s: 123, 183.
    assert RETRY_MAX == 60
    assert [(n, at - t0) for n, at in schedule] == [
        (0, 1), (1, 3), (2, 7), (3, 15), (4, 31), (5, 63), (6, 123), (7, 183)]
    assert store.status.retries == 8
    await store.aclose()
    assert [r["text"] for r in exported(tmp_path / "r2.db")] == [words(1)]


async def test_records_still_waiting_at_close_are_reported_lost(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    store = await AsyncStore.open(tmp_path / "r2.db")
    sid = await store.start_session(backend="local", model="m", voice=None)
    await cap_pages(store)
    await store.record(sid, [StoreMessage("user", "u1", 1, words(1))])
    await store.record(sid, [StoreResponse("r1", "in_progress")])
    await store.aclose()  # one last try, still full
    status = store.status
    assert str(status) == "database full: 2 records not written"
    assert (status.lost, status.transcripts_lost) == (2, 1)
    assert status.note == "database full: 2 records not written"
    assert "database full: 2 records (1 transcripts) could not be written and are lost" \
        in caplog.text


async def test_a_queued_write_refused_later_is_dropped_loudly_and_the_rest_written(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    store = await AsyncStore.open(tmp_path / "r2.db")
    sid = await store.start_session(backend="local", model="m", voice=None)
    await cap_pages(store)
    await store.record(sid, [StoreMessage("user", "u1", 1, words(1))])
    # Queued while full, refused when written (a role the schema does not know): nobody is
    # waiting for it any more, so it is counted and logged, and the queue goes on.
    await store.record(sid, [StoreMessage("system", "s2", 2, "refused")])
    await store.record(sid, [StoreMessage("assistant", "a3", 3, "after")])
    await free_space(store)
    await trio.sleep(1)
    await store.record(sid, [StoreMessage("user", "u4", 4, "later")])
    assert (store.status.state, store.status.dropped) == ("ok", 1)
    assert "a queued write (records) was refused and is dropped: role must be one of" \
        in caplog.text
    await store.aclose()
    assert [r["seq"] for r in exported(tmp_path / "r2.db")] == [1, 3, 4]


def test_what_counts_as_a_condition_to_wait_out(tmp_path: Path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert is_transient(full) and describe(full) == "database full"
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert describe(OSError(errno.EIO, "Input/output error")) == (
        "database unavailable (Input/output error)")
    assert not is_transient(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_transient(ValueError("role"))
    db = tmp_path / "r2.db"
    with Store.open(db) as s:
        pages = s.conn.execute("PRAGMA page_count").fetchone()[0]
        s.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(Exception) as e:
            s.write.start_session(backend="local", model="m", voice=BIG)
        assert is_transient(e.value) and describe(e.value) == "database full"


# ---------------------------------------------------------------------------- a real disk


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards (room for the schema and a WAL of ~40 commits:
    each message commit writes its row, its indexes and its full-text index pages)."""
    reason = _can_mount()
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if reason is None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                            str(mnt)], capture_output=True, text=True)
        reason = None if r.returncode == 0 else f"mount failed: {r.stderr.strip()}"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"tmpfs disk-full tests cannot run on CI: {reason}")
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last block with one file; returns it (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


async def test_a_database_that_cannot_be_opened_on_a_full_disk_is_waited_for(
        tiny_disk: Path, autojump_clock: trio.testing.MockClock) -> None:
    db = tiny_disk / "r2.db"
    filler = fill(tiny_disk)
    with pytest.raises(StoreUnavailable):  # what `export` or `prune` would say: exit 1
        Store.open(db)
    async with open_store(db) as store:  # the run starts all the same
        assert store.status.state == "waiting" and store.store is None
        sid = await store.start_session(backend="local", model="m", voice=None)
        for i in range(1, 6):
            await store.record(sid, [StoreMessage("user", f"u{i}", i, f"said {i}")])
        assert await store.recent_turns([sid], 5) == []
        assert store.status.waiting == 6
        filler.unlink()
        await settled(store)
        assert [t for _, t in await store.recent_turns([sid], 5)] == [
            f"said {i}" for i in range(1, 6)]
    assert [r["text"] for r in exported(db)] == [f"said {i}" for i in range(1, 6)]


async def test_a_disk_that_fills_mid_conversation_loses_nothing(
        tiny_disk: Path, autojump_clock: trio.testing.MockClock) -> None:
    db = tiny_disk / "r2.db"
    async with open_store(db) as store:
        sid = await store.start_session(backend="local", model="m", voice=None)
        await store.record(sid, [StoreMessage("user", "u1", 1, "hello")])
        filler = fill(tiny_disk)  # logs and other software fill the card
        for i in range(2, 40):
            await store.record(sid, [StoreMessage("user", f"u{i}", i, f"turn {i} " * 40)])
        assert store.status.state == "waiting" and store.status.waiting > 0
        filler.unlink()
        await settled(store)
    rows = exported(db)
    assert [r["seq"] for r in rows] == list(range(1, 40))
    assert rows[-1]["text"] == "turn 39 " * 40


async def test_replay_onto_a_full_disk_still_holds_the_conversation(
        tiny_disk: Path, tmp_path: Path) -> None:
    """Before: "not a usable r2d2voice database: disk I/O error", exit 2, no conversation."""
    fill(tiny_disk)
    r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--db",
                  str(tiny_disk / "r2.db"), cwd=tmp_path)
    err = r.stderr.decode()
    assert "not a usable" not in err
    # The robot talked (the transcripts were printed), but nothing could be kept: exit 1,
    # and the last line says how many transcripts were lost.
    said = [line for line in r.stdout.decode().splitlines() if line.startswith(("you:", "r2:"))]
    assert len(said) == 4
    assert r.returncode == 1, err
    lost = re.fullmatch(r"r2d2voice: error: database full: (\d+) transcripts \((\d+) records\)"
                        r" could not be written to .*r2\.db and are lost", err.splitlines()[-1])
    assert lost is not None, err
    assert int(lost[1]) == len(said) and int(lost[2]) > len(said)
