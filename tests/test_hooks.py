"""Hooks: ``[[hook]]`` in the tools file, real processes run on the events they name (the
event's JSON on stdin, sandboxed like command tools), never delaying the conversation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
from support import SAMPLES, run_cli

from r2d2voice.appliance.tools.config import read_tools_file
from r2d2voice.appliance.tools.hooks import HOOK_QUEUE, HookRunner, HookSpec, read_hooks
from r2d2voice.errors import ConfigError
from r2d2voice.system.events import NAMES, Events


def script(tmp_path: Path, body: str, name: str = "hook") -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def tools_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tools.toml"
    path.write_text(text)
    return path


def test_a_tools_file_with_hooks_is_read_and_checked(tmp_path: Path) -> None:
    hook = script(tmp_path, "cat")
    path = tools_file(tmp_path, f'builtins = ["get_time"]\n\n[[hook]]\non = ["speaking", '
                                f'"level"]\ncommand = ["{hook}", "--fast"]\ntimeout_s = 2\n')
    assert read_tools_file(path).builtins == ("get_time",)  # [[hook]] is a known section
    (spec,) = read_hooks(path)
    assert spec == HookSpec(("speaking", "level"), (hook, "--fast"), 2.0, 1)


@pytest.mark.parametrize(("entry", "problem"), [
    ('on = ["dancing"]\ncommand = ["HOOK"]', "hook #1: unknown event 'dancing' (known: "),
    ('command = ["HOOK"]', "hook #1: on must be a non-empty list of event names"),
    ('on = []\ncommand = ["HOOK"]', "hook #1: on must be a non-empty list"),
    ('on = ["spoken"]\ncommand = ["/nonexistent/r2-dome"]', "does not exist"),
    ('on = ["spoken"]\ncommand = ["HOOK"]\nshell = true', "hook #1: unknown key 'shell'"),
    ('on = ["spoken"]\ncommand = ["HOOK"]\ntimeout_s = 0', "hook #1: timeout_s must be"),
])
def test_a_bad_hook_is_one_line_naming_file_and_hook(tmp_path: Path, entry: str,
                                                     problem: str) -> None:
    hook = script(tmp_path, "cat")
    path = tools_file(tmp_path, "[[hook]]\n" + entry.replace("HOOK", hook) + "\n")
    with pytest.raises(ConfigError) as caught:
        read_hooks(path)
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)


def test_tools_check_and_a_replay_refuse_a_bad_hook_in_one_line(tmp_path: Path) -> None:
    path = tools_file(tmp_path, '[[hook]]\non = ["dancing"]\ncommand = ["/bin/cat"]\n')
    for args in (("tools", "--check"), ("replay", str(SAMPLES / "two_turns.wav"), "--backend",
                                        "local", "--db", str(tmp_path / "c.db"))):
        done = run_cli(*args, "--tools", str(path), cwd=tmp_path)
        assert done.returncode == 3, done.stderr
        assert done.stderr == (f"r2d2voice: error: {path}: hook #1: unknown event 'dancing' "
                               f"(known: {', '.join(NAMES)})\n")
    good = tools_file(tmp_path, '[[hook]]\non = ["spoken"]\ncommand = ["/bin/cat"]\n')
    assert run_cli("tools", "--check", "--tools", str(good), cwd=tmp_path).stdout == \
        "ok: 0 tools, 1 hook\n"


async def _run(hub: Events, runner: HookRunner, emit: list[tuple[str, dict]]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run, hub)
        for name, fields in emit:
            hub.emit(name, **fields)  # back to back: nothing waits for the hook
        hub.close()


async def test_a_hook_gets_the_events_it_names_in_order_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.jsonl"
    runner = HookRunner(HookSpec(("speaking", "spoken"), (script(tmp_path, f"cat >> {out}"),)))
    hub = Events()
    hub.set_session("s1")
    await _run(hub, runner, [
        ("thinking", {}), ("speaking", {"item_id": "a"}), ("level", {"rms": 0.5}),
        ("spoken", {"item_id": "a", "interrupted": False, "played_ms": 900}),
    ])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["event"], g["item_id"], g["session_id"]) for g in got] == [
        ("speaking", "a", "s1"), ("spoken", "a", "s1")]
    assert runner.ran == 2 and runner.failed == runner.dropped == 0
    assert not hub.wants("level")  # nobody named it: the speaker does not even measure it


async def test_a_slow_hook_loses_what_does_not_fit_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "got.jsonl"
    runner = HookRunner(HookSpec(("level",), (script(tmp_path, f"sleep 0.1; cat >> {out}"),)))
    hub = Events()
    with caplog.at_level(logging.WARNING):
        await _run(hub, runner, [("level", {"rms": i / 100}) for i in range(30)])
    # one taken at once, HOOK_QUEUE waiting: those ran, in order; the rest was dropped
    kept = HOOK_QUEUE + 1
    got = [json.loads(line)["rms"] for line in out.read_text().splitlines()]
    assert got == [i / 100 for i in range(kept)]
    assert runner.ran == kept and runner.dropped == 30 - kept
    assert f"{30 - kept} events dropped (slower than the events)" in caplog.text


@pytest.mark.parametrize(("body", "why"), [
    ("cat > /dev/null; echo 'no dome here' >&2; exit 3", "exit code 3: no dome here"),
    ("kill -SEGV $$", "killed by SIGSEGV"),
])
async def test_a_failing_or_crashing_hook_is_logged_and_runs_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, body: str, why: str) -> None:
    runner = HookRunner(HookSpec(("spoken",), (script(tmp_path, body),)))
    spoken = {"item_id": "a", "interrupted": True, "played_ms": 10}
    with caplog.at_level(logging.WARNING):
        await _run(Events(), runner, [("spoken", spoken)] * 3)
    assert runner.ran == 3 and runner.failed == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("hook #1 (hook): 1 failed (last: ") and why in warnings[0]
    assert "2 failed" in warnings[-1]  # the rest, once, when the run ends


async def test_a_hook_past_its_timeout_is_ended_and_the_next_event_runs(tmp_path: Path) -> None:
    out = tmp_path / "got.txt"
    body = f'read line; case "$line" in *first*) sleep 30;; esac; echo "$line" >> {out}'
    runner = HookRunner(HookSpec(("transcript",), (script(tmp_path, body),), timeout_s=0.5))
    await _run(Events(), runner, [("transcript", {"role": "user", "text": "first"}),
                                  ("transcript", {"role": "user", "text": "second"})])
    assert runner.failed == 1 and "second" in out.read_text() and "first" not in out.read_text()


def test_a_replay_runs_the_hooks_offline(tmp_path: Path) -> None:
    out = tmp_path / "spoken.jsonl"
    hook = script(tmp_path, f"cat >> {out}")
    path = tools_file(tmp_path, f'[[hook]]\non = ["spoken", "transcript"]\n'
                                f'command = ["{hook}"]\n')
    done = run_cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local",
                   "--tools", str(path), "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["event"] for g in got].count("spoken") == 2
    said = [f"{'you' if g['role'] == 'user' else 'r2'}: {g['text']}" for g in got
            if g["event"] == "transcript"]
    assert said == done.stdout.splitlines()[:4]
