"""The store inside a run: a full database shows in systemd's ``STATUS=`` next to what the
robot is doing, and the settings choose privacy mode and retention (pruning only what is
shipped when shipping is configured). Through a real replay: tests/test_retention.py (privacy,
retention) and tests/test_store_full.py (a full disk: exit 1, the transcripts lost counted)."""

from __future__ import annotations

import io
import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import trio
from storage_support import cap_pages, free_space, settled
from support import statuses

from r2d2voice.appliance.service import ServiceConsole
from r2d2voice.protocol.actions import StoreMessage
from r2d2voice.reports.export import run_export
from r2d2voice.storage.database import Store
from r2d2voice.storage.recorder import open_store, store_options
from r2d2voice.storage.retention import PruneResult
from r2d2voice.storage.shipping.local import shipped_sessions
from r2d2voice.system.config import Settings
from r2d2voice.system.notify import Notifier

BIG = "x" * 6000  # a record that needs new pages
LONG_AGO = datetime(2020, 1, 1, 9, 0, tzinfo=timezone.utc)


async def test_status_shows_a_full_database_through_the_conversations_updates(
        tmp_path: Path, notify_socket: tuple[str, socket.socket],
        autojump_clock: trio.testing.MockClock) -> None:
    address, sock = notify_socket
    console = ServiceConsole(Notifier(address))
    console.status("listening")
    async with open_store(tmp_path / "r2.db", on_status=console.store_status) as store:
        sid = await store.start_session(backend="local", model="m", voice=None)
        await cap_pages(store)  # the disk is full from here
        for i in range(1, 4):
            await store.record(sid, [StoreMessage("user", f"u{i}", i, BIG)])
        console.status("speaking")  # the conversation's update keeps the store's state
        await free_space(store)
        await settled(store)
        console.status("listening")
    assert statuses(sock) == [
        "listening",
        "listening · database full: 1 records waiting",
        "listening · database full: 2 records waiting",
        "listening · database full: 3 records waiting",
        "speaking · database full: 3 records waiting",
        "speaking",  # written: the state goes away
        "listening",
    ]


def old_conversation(db: Path) -> str:
    with Store.open(db, now=lambda: LONG_AGO) as store:
        sid = store.write.start_session(backend="local", model="m", voice=None)
        store.write.upsert_message(sid, role="user", item_id="u1", seq=1, text="long ago")
        store.write.end_session(sid)
    return sid


def exported(db: Path, **kw: Any) -> list[dict[str, Any]]:
    out = io.StringIO()
    run_export(db, out=out, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def session_ids(db: Path) -> list[str]:
    with Store.open(db, create=False) as store:
        return [s.id for s in store.read.list_sessions()]


async def test_store_options_follow_the_settings(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    assert store_options(Settings()) == {"store_text": True}
    shipping = Settings(retention_days=30, store_text=False,
                        ship_url="postgresql://r2d2@127.0.0.1:1/fleet")
    assert store_options(shipping) == {"store_text": False, "retention": timedelta(days=30),
                                       "only_shipped": shipped_sessions}
    # Retention runs with the store: an old conversation goes at once, unless shipping is
    # configured and the fleet server does not have it yet.
    for settings, kept in ((Settings(retention_days=30), False), (shipping, True)):
        db = tmp_path / f"{kept}.db"
        old = old_conversation(db)
        pruned: list[PruneResult] = []
        done = trio.Event()

        def note(result: PruneResult, pruned: list[PruneResult] = pruned,
                 done: trio.Event = done) -> None:
            pruned.append(result)
            done.set()

        async with open_store(db, on_prune=note, **store_options(settings)) as store:
            await done.wait()
            sid = await store.start_session(backend="local", model="m", voice=None)
            await store.record(sid, [StoreMessage("user", "u1", 1, "just now")])
        assert (pruned[0].sessions, pruned[0].unshipped) == ((0, 1) if kept else (1, 0))
        assert session_ids(db) == ([old, sid] if kept else [sid])
        text_kept = settings.store_text
        assert [(r["text"], r["text_kept"]) for r in exported(db, sessions=[sid])] == [
            ("just now" if text_kept else "(not kept)", text_kept)]
