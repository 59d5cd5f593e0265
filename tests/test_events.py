"""The event stream: the hub (what a moment looks like, bounded queues, level only on request,
privacy), the events socket, and ``r2d2voice events`` following a real ``replay``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from support import SAMPLES, clean_env, run_cli

from r2d2voice.system import events
from r2d2voice.system.event_socket import EVENTS_SOCKET, request_line, serve_events
from r2d2voice.system.events import FIELDS, Events


async def test_a_moment_is_one_json_object_with_its_labels_and_fields() -> None:
    ticks = iter([10.0, 10.5])
    hub = Events(clock=lambda: next(ticks), wall=lambda: "2026-01-02T03:04:05.678Z")
    with hub.following() as sub:
        hub.set_session("s1")
        hub.emit("speaking", item_id="item_1")
        hub.emit("spoken", item_id="item_1", interrupted=False, played_ms=1200)
        first, second = sub.receive.receive_nowait(), sub.receive.receive_nowait()
    assert json.loads(first.line) == {"event": "speaking", "t": "2026-01-02T03:04:05.678Z",
                                      "mono": 10.0, "session_id": "s1", "item_id": "item_1"}
    assert second.data["mono"] == 10.5 and second.data["played_ms"] == 1200


def test_the_event_names_are_the_issues() -> None:
    assert list(FIELDS) == [
        "listening", "waiting_for_wake", "wake", "user_speaking", "user_stopped", "thinking",
        "speaking", "level", "spoken", "transcript", "tool_started", "tool_finished",
        "conversation_started", "conversation_ended", "device_lost", "device_back", "budget",
        "error"]


async def test_a_full_queue_drops_and_counts_and_emit_never_waits() -> None:
    hub = Events()
    with hub.following(bound=4) as slow, hub.following(bound=100) as fast:
        for i in range(10):
            hub.emit("transcript", role="user", text=str(i))  # nobody reads meanwhile
        assert slow.dropped == 6 and fast.dropped == 0
        kept = [slow.receive.receive_nowait().data["text"] for _ in range(4)]
    assert kept == ["0", "1", "2", "3"]  # the oldest are kept: order is never broken


async def test_level_goes_only_to_those_who_ask_and_privacy_keeps_transcripts_in() -> None:
    hub = Events(privacy=True)
    with (hub.following() as everything, hub.following(["level"]) as lights,
          hub.following(level=True) as both):
        hub.emit("level", rms=0.25)
        hub.emit("thinking")
        hub.emit("transcript", role="user", text="secret")
        assert everything.receive.receive_nowait().name == "thinking"
        assert lights.receive.receive_nowait().data["rms"] == 0.25
        assert [both.receive.receive_nowait().name for _ in range(2)] == ["level", "thinking"]
        for sub in (everything, lights, both):
            with pytest.raises(trio.WouldBlock):
                sub.receive.receive_nowait()


async def test_a_bad_event_is_logged_once_and_never_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    hub = Events()
    with hub.following() as sub, caplog.at_level(logging.WARNING):
        hub.emit("speaking")  # its item_id is missing
        hub.emit("speaking")
        hub.emit("dancing", style="robot")
        hub.emit("thinking")
        assert sub.receive.receive_nowait().name == "thinking"
    problems = [r.getMessage() for r in caplog.records]
    assert len(problems) == 2, problems
    assert "speaking needs fields ['item_id']" in problems[0]


async def test_fields_may_be_called_name() -> None:
    hub = Events()
    with hub.following() as sub:
        hub.emit("tool_finished", name="turn_head", status="ok")
        events.emit("device_lost", kind="input", name="QuadCast")  # no hub installed
        assert sub.receive.receive_nowait().data["name"] == "turn_head"


async def test_another_thread_may_emit_and_the_run_delivers_in_order() -> None:
    hub = Events()
    with hub.following(level=True) as sub:
        def audio_thread() -> None:
            for i in range(5):
                hub.emit("level", rms=i / 10)

        await trio.to_thread.run_sync(audio_thread)
        got = []
        with trio.fail_after(5):
            while len(got) < 5:
                got.append((await sub.receive.receive()).data["rms"])
    assert got == [0.0, 0.1, 0.2, 0.3, 0.4]


async def test_the_module_emit_reaches_the_installed_hub_only() -> None:
    hub = Events()
    events.emit("thinking")  # no hub installed: nothing, no error
    with hub.following() as sub:
        with events.use(hub):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_emit_listening)  # a task of the run inherits the hub
        events.emit("thinking")  # no longer installed
        assert sub.receive.receive_nowait().name == "listening"
        with pytest.raises(trio.WouldBlock):
            sub.receive.receive_nowait()


async def _emit_listening() -> None:
    events.emit("listening")


def _follow(path: Path, line: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(line.encode())
    return sock


async def test_the_socket_is_owner_only_serves_followers_and_closes_when_the_run_ends(
        tmp_path: Path) -> None:
    hub = Events()
    async with trio.open_nursery() as nursery:
        path = await nursery.start(partial(serve_events, hub, directory=tmp_path))
        assert path == tmp_path / EVENTS_SOCKET
        assert os.stat(path).st_mode & 0o777 == 0o600
        sock = await trio.to_thread.run_sync(_follow, path, request_line(["spoken"], level=True))
        with trio.fail_after(5):
            while not hub.wants("spoken"):
                await trio.sleep(0.01)
        hub.emit("thinking")  # not asked for
        hub.emit("level", rms=0.5)
        hub.emit("spoken", item_id="i", interrupted=True, played_ms=300)
        hub.close()
    data = await trio.to_thread.run_sync(_read_all, sock)
    lines = [json.loads(x) for x in data.splitlines()]
    assert [x["event"] for x in lines] == ["level", "spoken"]
    assert lines[1]["interrupted"] is True
    assert not path.exists()


def _read_all(sock: socket.socket) -> str:
    sock.settimeout(10)
    chunks = []
    with sock:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_events_without_a_running_appliance_is_one_line_and_exit_1(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    done = run_cli("events", cwd=tmp_path, env={"XDG_RUNTIME_DIR": str(run_dir)})
    assert done.returncode == 1
    assert done.stderr.startswith("r2d2voice: error: no running r2d2voice found (looked in ")
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""
    bad = run_cli("events", "dancing", cwd=tmp_path, env={"XDG_RUNTIME_DIR": str(run_dir)})
    assert bad.returncode == 2 and "unknown event 'dancing'" in bad.stderr


def test_events_follows_a_replay_with_its_level_and_exits_0_when_it_stops(
        tmp_path: Path) -> None:
    """Real processes: `replay --backend local --speed realtime`, and `r2d2voice events --level`
    next to it; the follower ends with exit 0 when the replay is over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = clean_env(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(run_dir))
    replay = subprocess.Popen(
        [sys.executable, "-m", "r2d2voice", "replay", str(SAMPLES / "two_turns.wav"),
         "--backend", "local", "--speed", "realtime", "--db", str(tmp_path / "c.db")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (run_dir / "r2d2voice" / EVENTS_SOCKET).exists():
            assert replay.poll() is None, replay.communicate()
            assert time.monotonic() < deadline, "no events socket"
            time.sleep(0.02)
        follower = subprocess.run(
            [sys.executable, "-m", "r2d2voice", "events", "--level"], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=60)
        out, err = replay.communicate(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
    assert replay.returncode == 0, err
    assert follower.returncode == 0, follower.stderr
    moments = [json.loads(line) for line in follower.stdout.splitlines()]
    names = [m["event"] for m in moments]
    session = out.rsplit("(session ", 1)[1].rstrip(")\n")
    assert {m["session_id"] for m in moments if m["event"] != "level"} <= {session, None}
    assert any(m["session_id"] == session for m in moments)
    said = [f"{'you' if m['role'] == 'user' else 'r2'}: {m['text']}" for m in moments
            if m["event"] == "transcript"]
    assert said == out.splitlines()[:4]
    monos = [m["mono"] for m in moments]
    assert monos == sorted(monos)
    # each reply: speaking, ~20 level events a second while it plays, then spoken
    spoken = [m for m in moments if m["event"] == "spoken"]
    assert len(spoken) == 2
    # what the speaker played is what the reply WAV holds (a loaded machine may let the second
    # turn start over the first reply: a barge-in cuts it, and says so)
    wav_s = float(out.split(" s of reply audio in ")[0].rsplit(", ", 1)[1])
    assert sum(m["played_ms"] for m in spoken) / 1000 == pytest.approx(wav_s, abs=0.06)
    assert all(m["interrupted"] == (m["played_ms"] < 1000) for m in spoken)
    for reply in spoken:
        start = names.index("speaking", 0 if reply is spoken[0] else names.index("spoken") + 1)
        end = moments.index(reply)
        assert moments[start]["item_id"] == reply["item_id"]
        levels = [m for m in moments[start:end] if m["event"] == "level"]
        seconds = reply["played_ms"] / 1000
        assert 0.8 * 20 * seconds <= len(levels) <= 20 * seconds + 2
        assert all(0 <= m["rms"] <= 1 for m in levels) and max(m["rms"] for m in levels) > 0.01
    for state in ("user_speaking", "user_stopped", "thinking", "listening"):
        assert state in names
    assert names.index("user_stopped") < names.index("thinking") < names.index("speaking")



async def test_a_device_that_goes_away_and_comes_back_says_so_once_each(autojump_clock) -> None:
    """The simulated room of test_device_waiting.py: a microphone whose stream dies after
    10 s, twice; the second time it is waited for (device_lost), then back (device_back)."""
    from test_device_waiting import MIC, Room

    from r2d2voice.audio.availability import DeviceStates, keep_device

    room = Room()
    room.present, room.fail_after = True, 10.0
    hub = Events(clock=trio.current_time)
    with hub.following() as sub, events.use(hub):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_device("input", "QuadCast", room.session,
                                                   states=DeviceStates(), first=MIC,
                                                   find=room.find))
            await trio.sleep(25)
            nursery.cancel_scope.cancel()
        got = []
        while True:
            try:
                got.append(sub.receive.receive_nowait().data)
            except trio.WouldBlock:
                break
    assert [(m["event"], m["kind"], m["name"], m["mono"]) for m in got] == [
        ("device_lost", "input", "QuadCast", 20.0), ("device_back", "input", "QuadCast", 22.0)]
