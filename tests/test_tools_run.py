"""Running tool calls with real processes: arguments validated before anything runs, JSON on
stdin and never a shell, a minimal environment, capped output, and a timeout that ends the
whole process group."""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from r2d2voice.appliance.tools import Toolbox, ToolContext, ToolResult
from r2d2voice.appliance.tools.builtins import time_report
from r2d2voice.appliance.tools.config import CommandSpec
from r2d2voice.appliance.tools.process import run_command

DEGREES = {"type": "object", "required": ["degrees"], "additionalProperties": False,
           "properties": {"degrees": {"type": "integer", "minimum": -180, "maximum": 180}}}
TEXT = {"type": "object", "properties": {"text": {"type": "string"}}}
CTX = ToolContext(call_id="call_1")


def script(tmp_path: Path, body: str, name: str = "tool", shebang: str = "/bin/sh") -> str:
    """An executable file ``name`` in ``tmp_path`` running ``body``."""
    path = tmp_path / name
    path.write_text(f"#!{shebang}\n{body}")
    path.chmod(0o755)
    return str(path)


def box_with(tmp_path: Path, body: str, *, schema: dict | None = None, timeout_s: float = 10,
             shebang: str = "/bin/sh", **kwargs: object) -> Toolbox:
    spec = CommandSpec("turn_head", "Turn the dome.", schema or DEGREES,
                       (script(tmp_path, body, shebang=shebang),), timeout_s)
    return Toolbox((), (spec,), **kwargs)


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_for_file(path: Path) -> str:
    with trio.fail_after(10):  # real seconds when the test clock is a frozen MockClock
        while not path.exists() or not path.read_text().strip():
            await trio.to_thread.run_sync(time.sleep, 0.01)
    return path.read_text()


async def wait_gone(*pids: int) -> None:
    for _ in range(500):
        if all(gone(p) for p in pids):
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)
    raise AssertionError(f"still running: {[p for p in pids if not gone(p)]}")


async def test_valid_call_runs_once_with_arguments_on_stdin(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    box = box_with(tmp_path, f'cat >> {log}\necho >> {log}\necho "turned to -90"\n')
    result = await box.call("turn_head", '{\n  "degrees" : -90\n}', context=CTX)
    assert result == ToolResult("ok", "turned to -90", 0, result.duration_ms)
    assert json.loads(log.read_text()) == {"degrees": -90}
    assert log.read_text().count("\n") == 2  # one call: the JSON line and the separator


async def test_shell_metacharacters_in_arguments_are_never_interpreted(tmp_path: Path) -> None:
    m = tmp_path / "pwned"
    text = (f"; touch {m}1 | touch {m}2 && $(touch {m}3) `touch {m}4` > {m}5 "
            f"; rm -rf {tmp_path}")
    box = box_with(tmp_path, 'cat\n', schema=TEXT)
    result = await box.call("turn_head", json.dumps({"text": text}), context=CTX)
    assert result.status == "ok"
    assert json.loads(result.output) == {"text": text}
    assert not list(tmp_path.glob("pwned*"))
    assert (tmp_path / "tool").exists()


@pytest.mark.parametrize("arguments,message", [
    ('{"degrees": "left"}', "invalid arguments: degrees must be an integer"),
    ('{"degrees": 900}', "invalid arguments: degrees must be <= 180"),
    ("{}", "invalid arguments: degrees is required"),
    ('{"degrees": 9, "speed": 2}', "invalid arguments: unexpected argument speed"),
    ('{"degrees": NaN}', "invalid arguments: NaN is not a JSON number"),
    ('[90]', "invalid arguments: arguments must be a JSON object"),
    ('{"degrees": ', "invalid arguments: not valid JSON: Expecting value (line 1, column 13)"),
])
async def test_invalid_arguments_are_rejected_before_anything_runs(
        tmp_path: Path, arguments: str, message: str) -> None:
    ran = tmp_path / "ran"
    box = box_with(tmp_path, f"touch {ran}\n")
    result = await box.call("turn_head", arguments, context=CTX)
    assert (result.status, result.output, result.exit_code) == ("rejected", message, None)
    assert not ran.exists()


async def test_nested_argument_errors_name_the_path(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"moves": {"type": "array", "items": {
        "type": "object", "required": ["degrees"],
        "properties": {"degrees": {"type": "integer"}}}}}}
    box = box_with(tmp_path, "exit 0\n", schema=schema)
    result = await box.call("turn_head", '{"moves": [{"degrees": 1}, {"degrees": 1.5}]}',
                            context=CTX)
    assert result.output == "invalid arguments: moves[1].degrees must be an integer"
    result = await box.call("turn_head", '{"moves": [{}]}', context=CTX)
    assert result.output == "invalid arguments: moves[0].degrees is required"


async def test_unknown_and_not_enabled_tools_are_rejected(tmp_path: Path) -> None:
    box = box_with(tmp_path, "exit 0\n")
    unknown = await box.call("fly", "{}", context=CTX)
    assert unknown.status == "rejected"
    assert unknown.output == "tool 'fly' does not exist (available: turn_head)"
    off = await box.call("get_time", "{}", context=CTX)
    assert (off.status, off.output) == (
        "rejected", "tool 'get_time' is not enabled (available: turn_head)")


async def test_timeout_on_mock_clock(tmp_path: Path, autojump_clock: trio.testing.MockClock
                                     ) -> None:
    box = box_with(tmp_path, "echo starting\nexec sleep 300\n", timeout_s=5)
    result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert result.status == "timeout"
    assert result.exit_code is None
    assert result.output.startswith("timed out after 5 s and was stopped")


async def test_timeout_kills_the_whole_process_group(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """The tool and a child that ignores SIGTERM are both gone after the timeout."""
    pids = tmp_path / "pids"
    box = box_with(tmp_path, (
        "sh -c 'trap \"\" TERM; while :; do sleep 1; done' &\n"
        f'echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}\n'
        "echo partial\nwait\n"), timeout_s=3)
    results: list[ToolResult] = []

    async def call() -> None:
        results.append(await box.call("turn_head", '{"degrees": 1}', context=CTX))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        leader, child = map(int, (await wait_for_file(pids)).split())
        assert not gone(leader) and not gone(child)
        mock_clock.autojump_threshold = 0  # now let the 3 s (and the grace) pass
    [result] = results
    assert result.status == "timeout"
    assert result.output == "timed out after 3 s and was stopped; output so far: partial"
    await wait_gone(leader, child)


async def test_a_leftover_background_child_does_not_outlive_the_call(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    box = box_with(tmp_path, f"sleep 300 &\necho $! > {pid}\necho done\n")
    with trio.fail_after(5):  # the child holds stdout open: the call must not wait for it
        result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert (result.status, result.output) == ("ok", "done")
    await wait_gone(int(pid.read_text()))


async def test_cancelling_the_caller_still_ends_the_process_group(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    box = box_with(tmp_path, f"echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\nexec sleep 300\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(box.call, "turn_head", '{"degrees": 1}', context=CTX))
        leader = int(await wait_for_file(pid))
        nursery.cancel_scope.cancel()
    await wait_gone(leader)


async def test_a_tool_ignoring_sigterm_gets_sigkill_after_the_grace(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    pid = tmp_path / "pid"
    argv = (script(tmp_path, f"trap '' TERM\necho $$ > {pid}.tmp && mv {pid}.tmp {pid}\n"
                   "while :; do sleep 1; done\n"),)
    async with trio.open_nursery() as nursery:
        done = []
        nursery.start_soon(lambda: _collect(done, run_command(argv, b"{}", timeout_s=1,
                                                               grace_s=0.5)))
        leader = int(await wait_for_file(pid))
        mock_clock.autojump_threshold = 0
    assert done[0].timed_out and done[0].exit_code is None
    await wait_gone(leader)


async def _collect(into: list, awaitable: object) -> None:
    into.append(await awaitable)  # type: ignore[misc]


async def test_environment_is_minimal_without_the_api_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-do-not-leak-1234")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_do_not_leak")
    monkeypatch.setenv("R2D2_DB", "/tmp/x.db")
    spec = CommandSpec("show_env", "", {"type": "object"}, ("/usr/bin/env",), 10)
    box = Toolbox((), (spec,))
    result = await box.call("show_env", "{}", context=CTX)
    env = dict(line.split("=", 1) for line in result.output.splitlines())
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME"}
    assert env["HOME"] == "/" and env["PATH"]
    assert "do_not_leak" not in result.output and "do-not-leak" not in result.output


async def test_output_is_capped_and_a_chatty_tool_does_not_deadlock(tmp_path: Path) -> None:
    box = box_with(tmp_path, "head -c 1000000 /dev/zero | tr '\\0' a\necho tail >&2\n")
    result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert result.status == "ok"
    assert result.output == "a" * 16384 + "…[output cut at 16 KiB]"


async def test_non_zero_exit_is_an_error_and_stderr_goes_to_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = box_with(tmp_path, "echo motor jammed\necho 'servo 3 stalled' >&2\nexit 3\n")
    with caplog.at_level(logging.INFO, logger="r2d2voice.appliance.tools"):
        result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert result == ToolResult("error", "failed with exit code 3: motor jammed", 3,
                                result.duration_ms)
    assert "servo 3 stalled" in caplog.text
    assert "stalled" not in result.output


async def test_a_command_that_cannot_start_is_an_error(tmp_path: Path) -> None:
    box = box_with(tmp_path, "exit 0\n")
    (tmp_path / "tool").unlink()  # removed after the tools file was checked
    result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert (result.status, result.exit_code) == ("error", None)
    assert result.output == "tool could not start: No such file or directory"


async def test_killed_by_a_signal_is_an_error(tmp_path: Path) -> None:
    box = box_with(tmp_path, "kill -KILL $$\n")
    result = await box.call("turn_head", '{"degrees": 1}', context=CTX)
    assert (result.status, result.output, result.exit_code) == (
        "error", "killed by SIGKILL", -9)


async def test_at_most_max_concurrent_commands_run_at_once(tmp_path: Path) -> None:
    lock = tmp_path / "running"
    box = box_with(tmp_path, f"mkdir {lock} || exit 7\nsleep 0.2\nrmdir {lock}\necho ok\n",
                   max_concurrent=1)
    results: list[ToolResult] = []

    async def call() -> None:
        results.append(await box.call("turn_head", '{"degrees": 1}', context=CTX))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        nursery.start_soon(call)
    assert [r.status for r in results] == ["ok", "ok"]


async def test_python_tool_reads_its_arguments(tmp_path: Path) -> None:
    box = box_with(tmp_path, "import json, sys\nargs = json.load(sys.stdin)\n"
                   "print(f\"turned to {args['degrees']}\")\n", shebang=sys.executable)
    result = await box.call("turn_head", '{"degrees": -45}', context=CTX)
    assert (result.status, result.output) == ("ok", "turned to -45")


async def test_set_volume_persists_across_a_new_toolbox(tmp_path: Path) -> None:
    state = tmp_path / "state" / "tools.json"
    box = Toolbox(("set_volume",), state_path=state)
    assert box.volume.percent == 100 and box.volume.gain == 1.0
    heard: list[float] = []
    box.volume.subscribe(heard.append)
    result = await box.call("set_volume", '{"percent": 40}', context=CTX)
    assert (result.status, result.output) == ("ok", "volume set to 40 %")
    assert heard == [pytest.approx(0.16)]
    bad = await box.call("set_volume", '{"percent": 140}', context=CTX)
    assert bad.output == "invalid arguments: percent must be <= 100"
    again = Toolbox(("set_volume",), state_path=state)
    assert again.volume.percent == 40 and again.volume.gain == pytest.approx(0.16)


def test_unreadable_volume_state_falls_back_to_full_volume(tmp_path: Path) -> None:
    state = tmp_path / "tools.json"
    state.write_text("{not json")
    assert Toolbox(("set_volume",), state_path=state).volume.percent == 100


async def test_get_time_tells_the_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    result = await Toolbox(("get_time",)).call("get_time", "{}", context=CTX)
    assert result.status == "ok"
    assert "time zone Asia/Kolkata (IST, UTC+05:30)" in result.output


def test_time_report_format() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    now = datetime(2026, 1, 4, 9, 5, 7, tzinfo=ZoneInfo("America/New_York"))
    assert time_report(now) == (
        "Sunday 2026-01-04 09:05:07, time zone America/New_York (EST, UTC-05:00)")
    now = datetime(2026, 7, 4, 23, 0, 0, tzinfo=ZoneInfo("Asia/Kolkata"))
    assert time_report(now) == (
        "Saturday 2026-07-04 23:00:00, time zone Asia/Kolkata (IST, UTC+05:30)")


async def test_end_conversation_calls_the_callers_hang_up() -> None:
    ended: list[bool] = []
    box = Toolbox(("end_conversation",))
    ctx = ToolContext(call_id="call_9", on_end_conversation=lambda: ended.append(True))
    result = await box.call("end_conversation", "", context=ctx)
    assert result.status == "ok" and "goodbye" in result.output
    assert ended == [True]
