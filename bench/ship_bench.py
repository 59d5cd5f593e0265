"""Shipping throughput and memory: 1,000,000 messages into a PostgreSQL fleet server.

For now this measures the uploader alone (``FleetStore.upsert``): message rows are generated
in batches, as the robot's shipper will read them from SQLite, and shipped one batch per
transaction. It prints the time spent in the uploader (generating the rows is not counted),
rows/s and this process's peak RSS (the robot's side; the server's memory is not counted),
then ships everything a second time (idempotent: no row changes, nothing is rewritten) and
prints that too. Once ``r2d2voice ship`` exists, the same
figures come from a child process reading a real robot database.

Without ``--url`` it starts a throw-away cluster (``tests/pg.py``: initdb + pg_ctl on a free
loopback port, in /dev/shm when it can) and deletes it afterwards.

    .venv/bin/python bench/ship_bench.py                      # 1,000,000 rows, local cluster
    .venv/bin/python bench/ship_bench.py --rows 200000 --batch 2000
    .venv/bin/python bench/ship_bench.py --url postgresql://user@host/fleet
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from r2d2voice.storage.shipping.fleet import FleetStore, open_fleet

WORDS = [
    "beep", "boop", "whistle", "droid", "hello", "weather", "kitchen", "lights", "music",
    "timer", "sunny", "rain", "café", "naïve", '"quoted"', "comma,", "tab\there", "🤖", "✨",
    "—", "please", "thanks", "seven", "o'clock", "back\\slash", "new\nline",
]  # fmt: skip


def _label(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def sessions(count: int) -> list[dict[str, Any]]:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [
        dict(id=f"s{n:05d}", seq=n, started_at=_label(start + timedelta(hours=n)),
             ended_at=_label(start + timedelta(hours=n, minutes=50)), backend="openai",
             model="gpt-realtime", voice="marin", service_session_id=f"sess_{n}",
             previous_session_id=None, metadata='{"stats": {"frames_dropped": 0}}')
        for n in range(1, count + 1)
    ]


def message_batches(rows: int, per_session: int, batch: int) -> Iterator[list[dict[str, Any]]]:
    """``rows`` messages, ``batch`` at a time, generated as they are needed."""
    rng = random.Random(1)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out: list[dict[str, Any]] = []
    for n in range(rows):
        s, seq = divmod(n, per_session)
        role = "user" if seq % 2 == 0 else "assistant"
        out.append(dict(
            session_id=f"s{s + 1:05d}", seq=seq + 1, role=role,
            text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))),
            created_at=_label(start + timedelta(hours=s + 1, seconds=seq * 3)),
            item_id=f"item_{s}_{seq}", response_id=f"resp_{s}_{seq}" if role != "user" else None,
            interrupted=int(seq % 17 == 0 and role == "assistant"),
            played_ms=1200 if seq % 17 == 0 else None, raw_event=None,
        ))
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


def ship(fleet: FleetStore, rows: int, per_session: int, batch: int) -> tuple[float, int]:
    """Seconds spent in the uploader (row generation not counted), and rows sent."""
    spent = 0.0
    sent = 0
    for rows_batch in message_batches(rows, per_session, batch):
        t0 = time.perf_counter()
        sent += fleet.upsert("messages", "bench-robot", rows_batch)
        spent += time.perf_counter() - t0
    return spent, sent


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pg import open_pg_server  # the tests' throw-away cluster

    with open_pg_server() as pg:
        yield pg.url(pg.create_database())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="fleet server (default: a throw-away local cluster)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--per-session", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per transaction")
    args = parser.parse_args()
    nsessions = -(-args.rows // args.per_session)
    base_rss = peak_rss_mib()
    with server(args.url) as url, open_fleet(url) as fleet:
        print(f"fleet server {fleet.target} (schema v{fleet.schema_version})")
        fleet.upsert("sessions", "bench-robot", sessions(nsessions))
        print(f"{'run':<12} {'rows':>10} {'upload s':>8} {'rows/s':>9} {'peak RSS MiB':>13}")
        for name in ("ship", "ship again"):
            wall, sent = ship(fleet, args.rows, args.per_session, args.batch)
            print(f"{name:<12} {sent:>10,} {wall:>8.2f} {sent / wall:>9,.0f} "
                  f"{peak_rss_mib():>13.1f}")
        [total] = fleet._query("SELECT count(*) FROM messages")[0]
        assert total == args.rows, f"server holds {total} messages, expected {args.rows}"
    print(f"(peak RSS after imports, before shipping: {base_rss:.1f} MiB; batch {args.batch})")


if __name__ == "__main__":
    main()
