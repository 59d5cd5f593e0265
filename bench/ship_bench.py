"""Shipping a real robot database of 1,000,000 messages to a PostgreSQL fleet server.

Makes the database with the storage layer's schema (``Store.open``) and fast SQL inserts (one
transaction; ``--per-session`` messages per session), then runs ``ship_once`` in a child
process, as ``r2d2voice ship`` would, and prints wall time, rows/s and the child's peak RSS
(the robot's side; the server's memory is not counted):

1. the first ship (arming: every row queued in the change log, then shipped in batches),
2. a ship with nothing new,
3. a ship after ``--more`` new messages.

Then it times arming alone (the write lock a first ship holds while it queues every row).

``--writer-cost`` instead measures what change tracking costs the recorder: 10,000 message
upserts through ``Writer.upsert_message``, one transaction each as in a run, without the
change log, with it installed but not armed (a robot that never ships), and armed.

``--loop-lag`` instead measures what shipping costs the conversation: a task ticking every
20 ms on the trio event loop (the microphone's pace) while ``ship_alongside`` (what ``run``
starts) ships the whole database in its worker thread, against the same ticker alone. It
prints how late the ticks came (median, p99, max).

Without ``--url`` a throw-away cluster is started (``tests/pg.py``) and deleted afterwards.

    .venv/bin/python bench/ship_bench.py                       # 1,000,000 messages
    .venv/bin/python bench/ship_bench.py --rows 100000 --batch 2000
    .venv/bin/python bench/ship_bench.py --writer-cost [--dir /var/lib/r2d2voice]
    .venv/bin/python bench/ship_bench.py --loop-lag --rows 200000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import trio

from r2d2voice.storage.database import Store
from r2d2voice.storage.shipping.alongside import ShipPlan, ship_alongside
from r2d2voice.storage.shipping.forever import ShipStatus
from r2d2voice.storage.shipping.local import arm, ensure_ship_log
from r2d2voice.storage.timestamps import format_ts

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "beep", "boop", "whistle", "droid", "hello", "weather", "kitchen", "lights", "music",
    "timer", "sunny", "rain", "café", "naïve", '"quoted"', "comma,", "tab\there", "🤖", "✨",
    "—", "please", "thanks", "seven", "o'clock", "back\\slash", "new\nline",
]  # fmt: skip

_CHILD = """
import json, resource, sys, time
from r2d2voice.storage.shipping.shipper import ship_once
t0 = time.perf_counter()
report = ship_once(sys.argv[1], sys.argv[2], "bench-robot", batch=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": report.rows,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "line": str(report)}))
"""


def make_database(path: Path, rows: int, per_session: int, first: int = 0) -> None:
    """``rows`` messages (from message number ``first``) in sessions of ``per_session``."""
    rng = random.Random(first)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Store.open(path) as store:
        conn = store.conn
        conn.execute("BEGIN IMMEDIATE")
        for n in range(first, first + rows):
            s, seq = divmod(n, per_session)
            sid = f"s{s:06d}"
            at = start + timedelta(hours=s, seconds=seq * 3)
            if seq == 0 or n == first:
                conn.execute(
                    "INSERT OR IGNORE INTO sessions (id, seq, started_at, backend, model, voice,"
                    " metadata) VALUES (?, ?, ?, 'openai', 'gpt-realtime', 'marin', ?)",
                    (sid, s + 1, format_ts(at), '{"stats": {"frames_dropped": 0}}'))
            role = "user" if seq % 2 == 0 else "assistant"
            conn.execute(
                "INSERT INTO messages (session_id, seq, role, text, created_at, item_id,"
                " response_id, interrupted, played_ms, raw_event) VALUES (?, ?, ?, ?, ?, ?, ?,"
                " ?, ?, NULL)",
                (sid, seq + 1, role, " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))),
                 format_ts(at), f"item_{n}", None if role == "user" else f"resp_{n}",
                 int(seq % 17 == 0 and role == "assistant"), 1200 if seq % 17 == 0 else None))
        conn.execute("COMMIT")


def ship_in_child(path: Path, url: str, batch: int) -> dict[str, object]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), url, str(batch)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout)
    result["wall"] = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from pg import open_pg_server  # the tests' throw-away cluster

    with open_pg_server() as pg:
        yield pg.url(pg.create_database())


def bench_ship(args: argparse.Namespace, workdir: Path) -> None:
    path = workdir / "robot.db"
    t0 = time.perf_counter()
    make_database(path, args.rows, args.per_session)
    size = path.stat().st_size / 1048576
    print(f"robot database: {args.rows:,} messages, {size:.0f} MiB,"
          f" made in {time.perf_counter() - t0:.1f} s")
    with server(args.url) as url:
        print(f"{'run':<14} {'rows':>10} {'wall s':>7} {'rows/s':>9} {'child peak RSS MiB':>19}")
        for name in ("first ship", "nothing new", f"{args.more:,} more"):
            if name.endswith("more"):
                make_database(path, args.more, args.per_session, first=args.rows)
            r = ship_in_child(path, url, args.batch)
            total = sum(r["rows"].values())  # type: ignore[union-attr]
            wall = float(r["wall"])  # type: ignore[arg-type]
            print(f"{name:<14} {total:>10,} {wall:>7.2f} {total / wall:>9,.0f}"
                  f" {float(r['rss_mib']):>19.1f}")  # type: ignore[arg-type]
    with Store.open(path) as store:
        t0 = time.perf_counter()
        arm(store.conn, "another-server", "bench-robot", "elsewhere", format_ts(datetime.now()))
        print(f"arming alone (every row queued, one write transaction):"
              f" {time.perf_counter() - t0:.2f} s for {args.rows + args.more:,} messages")
    print(f"(batch {args.batch}; ship time includes the child's start, ~0.2 s)")


def _upserts(path: Path, mode: str, n: int) -> float:
    """Seconds per upsert of ``n`` messages into a new database at ``path``."""
    with Store.open(path) as store:
        if mode != "no change log":
            ensure_ship_log(store.conn)
        if mode == "log, armed":
            arm(store.conn, "f", "d", "s", "now")
        sid = store.write.start_session(backend="local", model="m", voice=None)
        t0 = time.perf_counter()
        for i in range(n):
            store.write.upsert_message(sid, role="user", item_id=f"i{i}", seq=i + 1,
                                       text="hello there, little droid")
        return (time.perf_counter() - t0) / n


def bench_writer(workdir: Path, n: int = 10_000, rounds: int = 3) -> None:
    modes = ("no change log", "log, not armed", "log, armed")
    best = dict.fromkeys(modes, float("inf"))
    for r in range(rounds):  # interleaved, best of each: less noise from the neighbours
        for mode in modes:
            path = workdir / f"writer-{r}-{modes.index(mode)}.db"
            best[mode] = min(best[mode], _upserts(path, mode, n))
            path.unlink()
    print(f"{n:,} message upserts, one transaction each, in {workdir} (best of {rounds}):")
    for mode in modes:
        print(f"  {mode:<16} {best[mode] * 1e6:8.1f} µs per upsert")


TICK = 0.02  # the microphone's frame


async def _tick_until(done: trio.Event, seconds: float | None = None) -> list[float]:
    """Lateness (s) of each 20 ms tick until ``done`` is set (or ``seconds`` passed)."""
    late: list[float] = []
    start = trio.current_time()
    n = 0
    while not done.is_set() and (seconds is None or n * TICK < seconds):
        n += 1
        await trio.sleep_until(start + n * TICK)
        late.append(trio.current_time() - (start + n * TICK))
    return late


def _lag_row(name: str, late: list[float], extra: str = "") -> None:
    late = sorted(late)
    ms = [x * 1000 for x in (late[len(late) // 2], late[int(len(late) * 0.99)], late[-1])]
    print(f"{name:<22} {len(late):>7,} {ms[0]:>8.2f} {ms[1]:>8.2f} {ms[2]:>8.2f}  {extra}")


async def _lag(path: Path, url: str, batch: int) -> None:
    idle = await _tick_until(trio.Event(), seconds=10)
    done = trio.Event()
    last: list[ShipStatus] = []

    def status(state: ShipStatus) -> None:
        last.append(state)
        if state.state != "waiting":
            done.set()

    t0 = trio.current_time()
    async with ship_alongside(ShipPlan(str(path), url, "bench-robot"), status=status,
                              batch=batch):
        late = await _tick_until(done)
        seconds = trio.current_time() - t0
    print(f"{'ticker':<22} {'ticks':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    _lag_row("alone", idle)
    shipped = last[-1].shipped if last else 0
    _lag_row("while shipping", late,
             f"{shipped:,} rows in {seconds:.1f} s ({last[-1].state if last else '-'})")


def bench_lag(args: argparse.Namespace, workdir: Path) -> None:
    path = workdir / "robot.db"
    make_database(path, args.rows, args.per_session)
    with server(args.url) as url:
        trio.run(_lag, path, url, args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="fleet server (default: a throw-away local cluster)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--more", type=int, default=10_000)
    parser.add_argument("--per-session", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per transaction")
    parser.add_argument("--dir", help="where the robot database goes (default: a temp dir)")
    parser.add_argument("--writer-cost", action="store_true",
                        help="measure the change log's cost on the write path instead")
    parser.add_argument("--loop-lag", action="store_true",
                        help="measure how late a 20 ms ticker gets while shipping instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.writer_cost:
            bench_writer(Path(tmp))
        elif args.loop_lag:
            bench_lag(args, Path(tmp))
        else:
            bench_ship(args, Path(tmp))
    os.sync()


if __name__ == "__main__":
    main()
