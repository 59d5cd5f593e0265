"""Export throughput and memory on a large transcript database.

Builds (once) a database of ``--rows`` messages spread over ``--sessions`` sessions, then runs
the export in a child process for each format, to ``/dev/null``, and prints wall time, rows/s
and the child's peak RSS. A one-session export and a bare import give the memory baseline:
a streaming export's peak RSS should not grow with the number of rows.

The child is ``python -m r2d2voice export ...`` when ``r2d2voice.cli`` imports, otherwise a
``python -c`` call of :func:`r2d2voice.reports.export.run_export` with the same arguments.

    .venv/bin/python bench/export_bench.py                # 1,000,000 rows in a temp dir
    .venv/bin/python bench/export_bench.py --db /var/tmp/big.db --rows 200000
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from r2d2voice.storage.database import Store
from r2d2voice.storage.timestamps import format_ts

FALLBACK = """
import sys
from r2d2voice.reports.export import run_export
db, fmt, output, *sessions = sys.argv[1:]
with open(output, "w", encoding="utf-8", newline="") as out:
    run_export(db, fmt=fmt, out=out, sessions=sessions)
"""

WORDS = [
    "beep", "boop", "whistle", "droid", "hello", "weather", "kitchen", "lights", "music",
    "timer", "sunny", "rain", "café", "naïve", '"quoted"', "comma,", "=formula", "🤖", "✨",
    "—", "please", "thanks", "seven", "o'clock",
]  # fmt: skip


def cli_available() -> bool:
    try:
        import r2d2voice.cli.main  # noqa: F401
    except Exception:
        return False
    return True


def build(db: str, rows: int, sessions: int) -> None:
    """Create the schema through Store, then bulk-insert straight through sqlite3."""
    Store.open(db).close()
    rng = random.Random(1)
    per = max(1, rows // sessions)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # a bench fixture, not the appliance's writes
    written = 0
    s = 0
    while written < rows:
        t0 = start + timedelta(hours=s)
        sid = f"{t0:%Y%m%dT%H%M%SZ}-{s:06x}"
        n = min(per, rows - written)
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO sessions (id, seq, started_at, ended_at, backend, model, voice)"
            " VALUES (?, ?, ?, ?, 'openai', 'gpt-realtime', 'ash')",
            (sid, s + 1, format_ts(t0), format_ts(t0 + timedelta(seconds=2 * n + 1))),
        )
        batch = []
        for i in range(n):
            role = "user" if i % 2 == 0 else "assistant"
            text = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
            if i % 17 == 0:
                text += "\nsecond line"
            interrupted = role == "assistant" and i % 11 == 1
            batch.append(
                (
                    sid,
                    i + 1,
                    role,
                    text,
                    format_ts(t0 + timedelta(seconds=2 * i + 1)),
                    f"item_{s}_{i}",
                    None if role == "user" else f"resp_{s}_{i}",
                    int(interrupted),
                    rng.randint(100, 5000) if interrupted else None,
                )
            )
        conn.executemany(
            "INSERT INTO messages (session_id, seq, role, text, created_at, item_id,"
            " response_id, interrupted, played_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            batch,
        )
        conn.execute("COMMIT")
        written += n
        s += 1
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def count(db: str) -> tuple[int, str]:
    with Store.open(db, create=False) as s:
        n = s.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        first = s.read.list_sessions()[0].id if n else ""
    return n, first


def run_child(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one child process."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace"))
    return wall, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is KiB on Linux


def export_argv(db: str, fmt: str, sessions: list[str], use_cli: bool) -> list[str]:
    if use_cli:
        argv = [sys.executable, "-m", "r2d2voice", "export", "--db", db, "--format", fmt]
        for sid in sessions:
            argv += ["--session", sid]
        return [*argv, "--output", os.devnull]
    return [sys.executable, "-c", FALLBACK, db, fmt, os.devnull, *sessions]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", help="database path (built if missing or smaller than --rows)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--formats", default="jsonl,csv,markdown")
    args = ap.parse_args()

    tmp = None
    if args.db:
        db = args.db
    else:
        tmp = tempfile.TemporaryDirectory(prefix="r2d2voice-bench-")
        db = os.path.join(tmp.name, "bench.db")
    try:
        have = count(db)[0] if os.path.exists(db) else 0
        if have < args.rows:
            if os.path.exists(db):
                sys.exit(f"{db} has {have} messages, fewer than --rows; pick another --db")
            t0 = time.perf_counter()
            build(db, args.rows, args.sessions)
            print(f"built {args.rows:,} messages in {time.perf_counter() - t0:.1f} s")
        rows, first = count(db)
        size = os.path.getsize(db) / 2**20
        use_cli = cli_available()
        via = "python -m r2d2voice export" if use_cli else "python -c run_export(...) (no cli yet)"
        print(f"database: {db} ({rows:,} messages, {size:.0f} MiB); child: {via}")

        runs: list[tuple[str, int, list[str], list[str]]] = [
            ("import only", 0, [sys.executable, "-c", "import r2d2voice.reports.export"], []),
            ("jsonl, 1 session", rows // args.sessions, [], [first]),
        ]
        runs += [(fmt, rows, [], []) for fmt in args.formats.split(",")]
        print(f"{'run':<18} {'rows':>10} {'wall s':>8} {'rows/s':>10} {'peak RSS MiB':>13}")
        failed = False
        for label, n, argv, sessions in runs:
            fmt = "jsonl" if label.startswith("jsonl") else label
            argv = argv or export_argv(db, fmt, sessions, use_cli)
            wall, rss, code = run_child(argv)
            failed |= code != 0
            rate = f"{n / wall:,.0f}" if n else "-"
            print(f"{label:<18} {n:>10,} {wall:>8.2f} {rate:>10} {rss:>13.1f}"
                  + ("" if code == 0 else f"  (exit {code})"))  # fmt: skip
        return 1 if failed else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
