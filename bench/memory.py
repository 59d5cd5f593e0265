"""The memory's speed and size on a large record: ``recall`` over a million messages, loading the
memory at the start of a session, the full-text index's size, its write cost, the migration.

Builds (once, or reuses ``--db``) a database through the store's schema: ``--rows`` messages in
sessions of 1,000, two years of labels, words drawn from a Zipf-distributed vocabulary (80
everyday English words for 60 % of each message, the rest from 25,000 made-up content words:
names, places and things), written through the triggers as a run writes them; plus ``--facts``
remembered facts. Then prints:

* the index's pages against the messages' (``dbstat``), per million messages;
* ``recall`` (the tool's query) and the whole tool call (open + recall + JSON) for queries from
  a rare name to all-common words, median / p95 / max of ``--runs`` warm runs;
* loading the memory at a session's start (open read-only + facts within 500 tokens + when the
  last conversation was), median / max;
* the write cost: message upserts one transaction each, as a run writes them, with the index
  and without it (its triggers dropped), on disk and in /dev/shm;
* ``--migration``: a copy without the memory (schema v5) upgraded to v6, timed.

    .venv/bin/python bench/memory.py                       # 1,000,000 messages, ~10 min to build
    .venv/bin/python bench/memory.py --db /var/tmp/mem.db --rows 200000 --migration
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from r2d2voice.appliance.tools.memory import Memory
from r2d2voice.appliance.tools.memory_brief import memory_text
from r2d2voice.storage import memory
from r2d2voice.storage.database import Store
from r2d2voice.storage.timestamps import format_ts
from r2d2voice.system.config import Settings

COMMON = (
    "the", "you", "i", "to", "a", "and", "is", "it", "that", "of", "what", "in", "do", "my",
    "me", "we", "your", "for", "have", "be", "on", "this", "can", "are", "was", "with", "not",
    "just", "so", "like", "know", "about", "he", "she", "they", "at", "there", "how", "all",
    "but", "one", "get", "if", "or", "go", "no", "yes", "well", "here", "want", "would", "now",
    "up", "out", "see", "think", "did", "time", "day", "today", "tomorrow", "yesterday", "good",
    "okay", "please", "thanks", "really", "very", "much", "some", "more", "when", "where",
    "who", "why", "which", "could", "should", "will", "tell", "said", "say", "right", "oh",
    "hey", "hello",
)  # fmt: skip
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
SPAN = timedelta(days=730)
PER_SESSION = 1000
PER_COMMIT = 10 * PER_SESSION  # messages per build transaction


def content_words(n: int) -> list[str]:
    rng = random.Random(7)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(consonants) + rng.choice(vowels)
                      for _ in range(rng.randint(2, 4)))] = None
    return list(words)


CONTENT = content_words(25_000)


def build(db: str, rows: int, facts: int) -> float:
    """The database, through the store's schema and the memory's triggers; returns seconds."""
    Store.open(db).close()
    rng = random.Random(1)
    common_w = list(itertools.accumulate(1 / (k + 1) for k in range(len(COMMON))))
    content_w = list(itertools.accumulate(1 / (k + 1) ** 1.05 for k in range(len(CONTENT))))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # a bench fixture, not the appliance's writes
    started = time.perf_counter()
    step = SPAN / rows
    for first in range(0, rows, PER_SESSION):
        n = min(PER_SESSION, rows - first)
        t0 = START + step * first
        sid = f"{t0:%Y%m%dT%H%M%SZ}-{first:08x}"
        if first % PER_COMMIT == 0:
            conn.execute("BEGIN")
        conn.execute("INSERT INTO sessions (id, seq, started_at, backend, model)"
                     " VALUES (?, ?, ?, 'openai', 'gpt-realtime')",
                     (sid, first // PER_SESSION + 1, format_ts(t0)))
        batch = []
        for i in range(n):
            k = rng.randint(4, 25)
            common = int(k * 0.6)
            words = (rng.choices(COMMON, cum_weights=common_w, k=common)
                     + rng.choices(CONTENT, cum_weights=content_w, k=k - common))
            rng.shuffle(words)
            batch.append((sid, i + 1, "user" if i % 2 == 0 else "assistant", " ".join(words),
                          format_ts(t0 + step * i), f"item_{i}"))
        conn.executemany("INSERT INTO messages (session_id, seq, role, text, created_at,"
                         " item_id) VALUES (?, ?, ?, ?, ?, ?)", batch)
        done = first + n
        if done % PER_COMMIT == 0 or done == rows:
            conn.execute("COMMIT")
        if done % 100_000 == 0 or done == rows:
            print(f"  {done:,} messages, {time.perf_counter() - started:.0f} s", flush=True)
    conn.execute("BEGIN")
    for i in range(facts):
        text = f"{rng.choice(CONTENT).title()} " + " ".join(rng.choices(CONTENT, k=8))
        conn.execute("INSERT INTO facts (text, created_at, source) VALUES (?, ?, 'owner')",
                     (text, format_ts(START + SPAN * (i / max(1, facts)))))
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


def sizes(db: str) -> tuple[int, int, int]:
    """Bytes of the message rows (table + its indexes), of the full-text index, and the file."""
    conn = sqlite3.connect(db)
    try:
        by_name = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
    finally:
        conn.close()
    rows = sum(v for k, v in by_name.items()
               if k in ("messages", "messages_by_seq", "sqlite_autoindex_messages_1"))
    index = sum(v for k, v in by_name.items() if k.startswith("messages_fts"))
    return rows, index, os.path.getsize(db)


def timed(fn, runs: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """Median, p95 and max milliseconds of ``runs`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], times[-1]


def matches(conn: sqlite3.Connection, word: str) -> int:
    return conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?",
                        (f'"{word}"',)).fetchone()[0]


def bench_recall(db: str, runs: int) -> None:
    now = START + SPAN
    conn = sqlite3.connect(db)
    rare, medium, frequent = CONTENT[20_000], CONTENT[2_000], CONTENT[20]
    queries = [
        ("a rare name", rare),
        ("a word said now and then", medium),
        ("a frequent word", frequent),
        ("two names", f"{rare} {medium}"),
        ("a sentence", f"what did we say about {medium} and the {rare} yesterday"),
        ("every word common", "what did you say about the time"),
    ]
    print(f"\nrecall, {runs} warm runs each (ms):")
    print("| query | matches of its words | recall p50 | p95 | max | tool call p50 |")
    print("|---|---|---|---|---|---|")
    tool = Memory(db)
    for what, query in queries:
        counts = "/".join(f"{matches(conn, w):,}" for w in memory.query_words(query))
        p50, p95, worst = timed(lambda q=query: memory.recall(conn, q, now=now), runs)
        call = timed(lambda q=query: tool._with_db(tool._recall, {"query": q}), runs)[0]
        print(f"| {what} | {counts} | {p50:.1f} | {p95:.1f} | {worst:.1f} | {call:.1f} |")
    conn.close()


def bench_session_start(db: str, runs: int) -> None:
    settings = Settings(db=db)  # type: ignore[arg-type]
    p50, _, worst = timed(lambda: memory_text(settings), runs)
    n = len(memory_text(settings).splitlines())
    print(f"\nloading the memory at a session's start (open read-only, facts within 500 tokens,"
          f" last conversation; {n} lines): p50 {p50:.2f} ms, max {worst:.2f} ms")


def _upserts(path: str, n: int, seed: int) -> float:
    """µs per message upsert, one transaction each (synchronous FULL, as in a run)."""
    with Store.open(path) as store:
        sid = store.write.start_session(backend="local", model="m", voice=None)
        rng = random.Random(seed)
        texts = [" ".join(rng.choices(CONTENT[:2000], k=12)) for _ in range(n)]
        t = time.perf_counter()
        for i, text in enumerate(texts):
            store.write.upsert_message(sid, role="user", item_id=f"i{i}", seq=i, text=text)
        return (time.perf_counter() - t) / n * 1e6


def write_cost(tmp: str, n: int = 2000, rounds: int = 5) -> None:
    """Message upserts with the index and without it (its triggers dropped), rounds
    interleaved, best of each: on disk (the commit's fsync dominates) and in /dev/shm (CPU)."""
    places = [("on disk", tmp)]
    if os.path.isdir("/dev/shm"):
        places.append(("in /dev/shm", tempfile.mkdtemp(prefix="r2mem-", dir="/dev/shm")))
    print(f"\nwrite cost, {n:,} message upserts one transaction each, best of {rounds}:")
    for where, directory in places:
        paths = {}
        for label in ("with the index", "without it"):
            path = paths[label] = os.path.join(directory, f"write-{len(paths)}.db")
            Store.open(path).close()
            if label == "without it":
                conn = sqlite3.connect(path)
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type ="
                                            " 'trigger' AND name LIKE 'messages_fts_%'"
                                            ).fetchall():
                    conn.execute(f"DROP TRIGGER {name}")
                conn.close()
        best = dict.fromkeys(paths, float("inf"))
        for r in range(rounds):
            for label, path in paths.items():
                best[label] = min(best[label], _upserts(path, n, r))
        print(f"  {where}: " + ", ".join(f"{v:.1f} µs {k}" for k, v in best.items()))
        if directory != tmp:
            shutil.rmtree(directory, ignore_errors=True)


def migration(db: str, tmp: str) -> None:
    """A copy without the memory (schema v5), then the v5 -> v6 upgrade, timed."""
    copy = os.path.join(tmp, "v5.db")
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy, isolation_level=None)
    memory_objects = ("messages_fts%", "facts_fts%", "memory_%", "recall_exclusions%",
                      "ship_log_facts%", "ship_log_recall%", "facts")
    where = " OR ".join("name LIKE ?" for _ in memory_objects)
    for kind in ("trigger", "view", "table"):
        for (name,) in conn.execute(f"SELECT name FROM sqlite_master WHERE type = ? AND"
                                    f" ({where})", (kind, *memory_objects)).fetchall():
            if not name.endswith(("_data", "_idx", "_docsize", "_config")):  # FTS5's own
                conn.execute(f"DROP {kind.upper()} IF EXISTS {name}")
    conn.execute("PRAGMA user_version = 5")
    conn.execute("VACUUM")
    conn.close()
    t = time.perf_counter()
    with Store.open(copy) as store:
        seconds = time.perf_counter() - t
        indexed = store.conn.execute("SELECT count(*) FROM messages_fts_docsize").fetchone()[0]
    print(f"\nmigration v5 -> v6: {seconds:.1f} s ({indexed:,} messages indexed)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="database to build or reuse (default: a temp dir)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--migration", action="store_true",
                        help="also time the v5 -> v6 migration of a copy")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="r2mem-")
    db = args.db or os.path.join(tmp, "memory.db")
    try:
        if not os.path.exists(db):
            print(f"building {args.rows:,} messages and {args.facts} facts in {db}")
            seconds = build(db, args.rows, args.facts)
            print(f"built in {seconds:.0f} s ({args.rows / seconds:,.0f} messages/s, the index"
                  " written by the triggers)")
        with Store.open(db, create=False) as store:
            rows = store.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        message_bytes, index_bytes, file_bytes = sizes(db)
        per_million = 1_000_000 / max(1, rows)
        print(f"\n{rows:,} messages; file {file_bytes / 2**20:,.1f} MiB: message rows"
              f" {message_bytes / 2**20:,.1f} MiB, full-text index {index_bytes / 2**20:,.1f} MiB"
              f" (+{index_bytes / message_bytes:.0%}); per million messages:"
              f" {index_bytes * per_million / 2**20:,.1f} MiB of index")
        bench_recall(db, args.runs)
        bench_session_start(db, args.runs)
        write_cost(tmp)
        if args.migration:
            migration(db, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
