"""Helpers for the storage and report tests: a wall clock the test steps by hand, and
databases written as a run writes them (for the report and fleet tests)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import trio

from r2d2voice.protocol.actions import Record, StoreInterrupted, StoreMessage, StoreResponse
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult
from r2d2voice.storage.database import Store
from r2d2voice.storage.pending import StoreStatus
from r2d2voice.storage.recorder import AsyncStore

T0 = datetime(2025, 11, 21, 9, 30, 0, tzinfo=timezone.utc)


class SteppedClock:
    """A writer's wall clock (``now``) that moves only when the test says so."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when

    def step(self, **delta: float) -> None:
        """Jump by ``timedelta(**delta)``, forward or back (NTP stepping a board's clock)."""
        self.now += timedelta(**delta)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---------------------------------------------------------------------------- a full database


async def cap_pages(store: AsyncStore, pages: int | None = None) -> None:
    """Cap the database at ``pages`` (default: its current size, so the next write that needs
    a page fails with SQLITE_FULL)."""
    assert store.store is not None
    conn = store.store.conn

    def cap() -> None:
        n = pages or conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {n}")

    await store.call(cap)


async def free_space(store: AsyncStore) -> None:
    await cap_pages(store, 1_000_000)


async def settled(store: AsyncStore, *, max_retries: int = 10) -> None:
    """Until the retries have written everything. It waits for the state, not for a moment:
    while a write runs in its thread the autojump clock may run far ahead."""
    done = trio.Event()
    previous = store.on_status

    def watch(status: StoreStatus) -> None:
        if previous is not None:
            previous(status)
        if status.state != "waiting" or status.retries > max_retries:
            done.set()

    store.on_status = watch
    if store.status.state == "waiting":
        await done.wait()
    store.on_status = previous
    assert store.status.state == "ok", store.status


# ---------------------------------------------------------------------------- report data

DAY1 = datetime(2025, 11, 20, 9, 30, 0, tzinfo=timezone.utc)
DAY2 = DAY1 + timedelta(days=1)


def usage(it: int, ia: int, ic: int, ot: int, oa: int) -> dict[str, Any]:
    """A GA ``response.usage`` object."""
    return {
        "total_tokens": it + ia + ot + oa,
        "input_tokens": it + ia,
        "output_tokens": ot + oa,
        "input_token_details": {"text_tokens": it, "audio_tokens": ia, "cached_tokens": ic},
        "output_token_details": {"text_tokens": ot, "audio_tokens": oa},
    }


def write_report_db(path: Path) -> dict[str, str]:
    """Session a on day 1, b and c (continuing b) on day 2, with known usage/latency/stats."""
    clock = SteppedClock(DAY1)
    with Store.open(path, now=clock) as store:
        s = store.write
        a = s.start_session(backend="openai", model="gpt-realtime", voice="ash",
                            metadata={"command": "run"})  # fmt: skip
        clock.set(DAY2)
        b = s.start_session(backend="openai", model="gpt-realtime", voice="ash")
        clock.set(DAY2 + timedelta(hours=1))
        c = s.start_session(backend="openai", model="gpt-realtime", voice="ash",
                            previous_session_id=b)
        clock.set(DAY1 + timedelta(seconds=5))
        s.record_response(a, response_id="r1", status="completed",
                          usage=usage(100, 300, 200, 10, 500), first_audio_ms=300)
        s.set_response_latency(a, response_id="r1", first_played_ms=350)
        clock.step(seconds=10)
        s.record_response(a, response_id="r2", status="cancelled",
                          usage=usage(0, 100, 0, 5, 50))
        s.set_response_latency(a, response_id="r2", first_audio_ms=500)
        clock.step(seconds=1)
        s.upsert_message(a, role="assistant", item_id="i2", seq=2, text="cut", response_id="r2")
        s.mark_interrupted(a, item_id="i2", seq=2, played_ms=700)
        for call, seq in (("c1", 3), ("c2", 4)):  # tool calls: 2 on day 1, 2 on day 2
            s.record_tool_call(a, call_id=call, item_id=f"fc_{call}", response_id="r2",
                               seq=seq, name="turn_head", arguments="{}")
        s.record_tool_result(a, call_id="c1", status="ok", duration_ms=40)
        s.record_tool_result(a, call_id="c2", status="timeout", duration_ms=5000)
        clock.set(DAY2 + timedelta(seconds=5))
        s.record_response(b, response_id="r3", status="completed",
                          usage=usage(40, 0, 40, 8, 120), first_audio_ms=200)
        s.set_response_latency(b, response_id="r3", first_played_ms=260)
        clock.step(seconds=1)
        s.record_response(b, response_id="r4", status="failed", usage=None)
        clock.step(seconds=1)
        s.record_error(b, source="service", type="server_error", code=None, message="boom")
        s.record_tool_call(b, call_id="c3", item_id="fc_c3", response_id=None, seq=1,
                           name="get_time", arguments="{}")
        s.record_tool_result(b, call_id="c3", status="ok", duration_ms=1)
        s.record_tool_call(b, call_id="c4", item_id="fc_c4", response_id=None, seq=2,
                           name="turn_head", arguments="{}")
        clock.set(DAY2 + timedelta(hours=1, seconds=5))
        s.record_response(c, response_id="r5", status="completed",
                          usage=usage(60, 140, 0, 20, 200))
        s.set_response_latency(c, response_id="r5", first_audio_ms=100, first_played_ms=150)
        s.set_session_stats(a, {"frames_dropped": 3, "underruns": 1, "reconnects": 0,
                                "interruptions": 1, "junk_messages": 0})  # fmt: skip
        s.set_session_stats(b, {"frames_dropped": 2, "reconnects": 1, "service_errors": 1,
                                "frames_gated": 40, "custom": 5, "note": "x"})  # fmt: skip
    return {"a": a, "b": b, "c": c}


def add_local_session(path: Path) -> str:
    """A session on the local backend (as a run records it: backend and model "local"),
    started after c and labelled on day 2, with one response of known usage: r6."""
    with Store.open(path, now=SteppedClock(DAY2 + timedelta(minutes=30))) as store:
        sid = store.write.start_session(backend="local", model="local", voice=None)
        store.write.record_response(sid, response_id="r6", status="completed",
                                    usage=usage(10, 200, 0, 5, 300))
    return sid


# ---------------------------------------------------------------------------- tool executions


async def record_a_conversation_with_tools(db: Path, *, store_text: bool = True) -> str:
    """Through the recorder, as the protocol core emits them: a call whose result comes after
    the next message was stored, a failing call, a rejected one, and one still running."""
    clock = SteppedClock()
    store = await AsyncStore.open(db, now=clock, store_text=store_text)
    sid = await store.start_session(backend="local", model="m", voice=None)
    clock.step(seconds=1)
    await store.record(sid, [StoreMessage("user", "u1", 1, "look left, then note it"),
                             StoreResponse("r1", "in_progress"),
                             StoreToolCall("call_1", "fc_1", "r1", 2, "turn_head",
                                           '{"degrees": -90}')])
    clock.step(seconds=1)
    await store.record(sid, [StoreMessage("assistant", "a1", 3, "Turning.", "r1"),
                             StoreToolResult("call_1", "ok", "turned to -90", 0, 41.2),
                             StoreToolCall("call_2", "fc_2", "r1", 4, "note",
                                           '{"text": "=cmd|x"}'),
                             StoreToolResult("call_2", "error", "-disk\nfull", 2, 7),
                             StoreToolCall("call_3", "fc_3", "r1", 5, "fly_*away*", "{bad"),
                             StoreToolResult("call_3", "rejected", "unknown tool: fly_*away*"),
                             StoreInterrupted("a1", 3, 800)])
    clock.step(seconds=1)
    await store.record(sid, [StoreToolCall("call_4", "fc_4", "r1", 6, "get_time", "{}"),
                             StoreMessage("assistant", "a2", 7, "Noted.", "r1")])
    await store.aclose()
    return sid


def add_wake_sessions(path: Path) -> None:
    """Four wake-word sessions (three spoken, one external), three of them over."""
    wakes = [("word", 0.91, 812, 14.5, "idle"), ("word", 0.88, 640, 3.0, "ended"),
             ("external", None, None, 1.0, "no service"), ("word", 0.95, None, None, None)]
    with Store.open(path, now=lambda: DAY1) as s:
        for source, score, ready, length, end in wakes:
            sid = s.write.start_session(backend="local", model="m", voice=None)
            s.write.update_session_metadata(sid, {
                "listen": "wake", "wake_source": source, "wake_word": "hey r2",
                "wake_score": score, "wake_at_s": 12.5})
            if end is not None:
                s.write.update_session_metadata(sid, {
                    "wake_ready_ms": ready, "conversation_s": length, "conversation_end": end})



# ---------------------------------------------------------------------------- GPT-Live sessions

LIVE_SECONDS = (15, 30, 45)  # the service's usage updates: totals, the last one final
LIVE_TOKENS = (120, 30)  # the delegated Responses model's input / output tokens


def add_live_session(path: Path, *, backend: str = "live") -> str:
    """A GPT-Live session recorded as a run records it: the Live core's own records for a
    conversation with one delegated tool response and usage updates of 15, 30 then 45 s."""
    from livecheck import (
        backend_created,
        backend_done,
        closed,
        delegated,
        said,
        started,
        usage,
    )
    from shipping_support import record

    from r2d2voice.live.client_events import LiveConfig
    from r2d2voice.live.conversation import LiveConversation

    core = LiveConversation(LiveConfig(instructions="x"))
    core.opening()
    events = [started("sess_live_usage"), said("user", "Turn left", 0, 800), usage(15),
              delegated("del_1", "responses", 900, "resp_live_1"),
              backend_created("del_1", "resp_live_1"),
              backend_done("del_1", "resp_live_1", tokens=LIVE_TOKENS),
              said("assistant", "Turned.", 1200, 1800), usage(30), closed("close_requested", 45)]
    # what the link hands the recorder: the records (not the turn's moments)
    actions = [a for i, e in enumerate(events) for a in core.receive(e, float(i))
               if isinstance(a, Record)]
    with Store.open(path, now=SteppedClock(DAY2 + timedelta(hours=1))) as store:
        sid = store.write.start_session(backend=backend, model="gpt-live-1", voice="marin")
        record(store, sid, actions)
    return sid
