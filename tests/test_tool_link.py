"""The robot acts: the model's function calls run through the link and their outputs reach the
model. On a MockClock against the local backend in memory (its ``--script`` makes the calls),
with the real Toolbox (built-ins; a slow tool where barge-in needs one); then end to end with
the CLI, real sockets, real tool processes and SQLite at the bottom."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio
import trio.testing
from fake_service import fast, realtime, speech
from local_link import CFG, LocalLink, inline_threads, talk
from support import SAMPLES, cli, local_backend

from r2d2voice.appliance.context import Stopper
from r2d2voice.appliance.sinks import WavSink
from r2d2voice.appliance.tools import Toolbox, ToolResult, runner
from r2d2voice.appliance.tools.config import CommandSpec
from r2d2voice.audio.pcm import FRAME_BYTES
from r2d2voice.audio.playout import PlayoutBuffer
from r2d2voice.link.state import LinkPolicy
from r2d2voice.link.tools import ToolJob, ToolNews, ToolRunner, ToolsOffered, no_tools
from r2d2voice.localbackend.faults import Faults
from r2d2voice.localbackend.script import Script, ScriptTurn
from r2d2voice.protocol.actions import Record, StoreError, StoreInterrupted
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

BUILTINS = ("get_time", "set_volume", "end_conversation")


@pytest.fixture(autouse=True)
def _inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    inline_threads(monkeypatch)


def turn(call: str | None = None, say: str | None = None, **arguments: Any) -> ScriptTurn:
    return ScriptTurn(say=say, call=call, arguments=json.dumps(arguments, indent=2))


def offering(toolbox: Toolbox) -> Any:
    return replace(CFG, tools=tuple(toolbox.session_tools()))


def assistant_texts(sessions: Any) -> list[str]:
    return [m.text for _, m in sessions.messages() if m.role == "assistant"]


HEAD_SCHEMA = {"type": "object", "required": ["degrees"],
               "properties": {"degrees": {"type": "integer"}}}


class SlowHead:
    """The built-ins plus ``turn_head``, a command tool whose program takes ``seconds`` (of
    trio's clock): the Toolbox validates and limits it as always, only the process is
    replaced by this stand-in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.toolbox = Toolbox(BUILTINS, (CommandSpec("turn_head", "Turn the dome.",
                                                      HEAD_SCHEMA, ("/bin/true",)),))
        monkeypatch.setattr(runner, "_run", self._run)

    async def _run(self, spec: CommandSpec, args: dict[str, Any]) -> ToolResult:
        self.calls.append(args)
        await trio.sleep(self.seconds)
        self.finished.append(args)
        return ToolResult("ok", f"turned to {args['degrees']}", 0)


async def test_set_volume_runs_once_its_output_reaches_the_model_and_quiets_the_robot(
    autojump_clock, tmp_path: Path
) -> None:
    toolbox = Toolbox(BUILTINS)
    link = LocalLink(script=Script((turn(say="hi"), turn("set_volume", "Quieter.", percent=50))))
    sink = WavSink(str(tmp_path / "reply.wav"), realtime=False)
    buffer = PlayoutBuffer()
    ctx, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5), config=offering(toolbox),
                               toolbox=toolbox, sink=sink, buffer=buffer)
    [call] = sessions.of_type(StoreToolCall)
    assert (call.name, json.loads(call.arguments)) == ("set_volume", {"percent": 50})
    assert [(r.call_id, r.status, r.output) for r in sessions.of_type(StoreToolResult)] == [
        (call.call_id, "ok", "volume set to 50 %")]
    # the output went back for its call, once, and the model's next reply quotes it
    assert link.outputs() == [{"type": "function_call_output", "call_id": call.call_id,
                               "output": "volume set to 50 %"}]
    assert assistant_texts(sessions) == [
        "hi", "Quieter.", "*beep* (tool set_volume said: volume set to 50 %)"]
    # the tool call sits in conversation order between the preamble and the answer
    seqs = {m.text: m.seq for _, m in sessions.messages()}
    assert seqs["Quieter."] < call.seq < seqs["*beep* (tool set_volume said: volume set to 50 %)"]
    # the offer: tools with tool_choice auto in session.update
    [update] = link.of_type("session.update")
    assert update["session"]["tool_choice"] == "auto"
    assert [t["name"] for t in update["session"]["tools"]] == list(BUILTINS)
    # replies after the call play at (50 %)² of the amplitude
    assert buffer.gain == pytest.approx(0.25) and ctx.stats.tool_calls == 1
    audio = sf.read(tmp_path / "reply.wav", dtype="int16")[0].astype(float)
    second = len(audio) // 3  # three replies of one second each, back to back
    loud, quiet = np.abs(audio[:second]).max(), np.abs(audio[2 * second:]).max()
    assert quiet == pytest.approx(loud * 0.25, rel=0.05)


async def test_unknown_tools_and_invalid_arguments_get_an_error_output_and_start_nothing(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = SlowHead(monkeypatch, seconds=1.0)
    toolbox = head.toolbox
    link = LocalLink(script=Script((turn("fly_away", speed=9), turn("turn_head", degrees="left"),
                                    turn("turn_head", degrees=-90))))
    _, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5, 1.0, 1.5), config=offering(toolbox),
                             toolbox=toolbox)
    results = sessions.of_type(StoreToolResult)
    assert [r.status for r in results] == ["rejected", "rejected", "ok"]
    assert "'fly_away' does not exist" in results[0].output
    assert results[1].output == "invalid arguments: degrees must be an integer"
    assert head.calls == [{"degrees": -90}]  # only the valid one ran
    assert [o["output"] for o in link.outputs()] == [r.output for r in results]
    quotes = [t for t in assistant_texts(sessions) if "(tool" in t]
    assert len(quotes) == 3 and "turned to -90" in quotes[2]


async def test_a_cut_response_runs_none_of_its_calls(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = SlowHead(monkeypatch, seconds=1.0)
    toolbox = head.toolbox
    link = LocalLink(script=Script((turn("turn_head", "Turning now, turning.", degrees=10),)),
                     faults=Faults(fail_responses=((1, "max_output_tokens"),)))
    _, sessions = await talk(link, fast(1.0, 1.5, 1.0), config=offering(toolbox),
                             toolbox=toolbox)
    assert head.calls == [] and link.outputs() == []
    for result in sessions.of_type(StoreToolResult):  # announced calls are audited as rejected
        assert result.status == "rejected" and "incomplete" in result.output
    assert len(sessions.messages()) >= 3  # and the conversation went on


async def test_a_tool_running_during_barge_in_still_delivers(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4 s tool runs while the user speaks again: it is not stopped, its output goes back
    and the model answers it."""
    head = SlowHead(monkeypatch, seconds=4.0)
    toolbox = head.toolbox
    link = LocalLink(script=Script((turn("turn_head", degrees=-90), turn(say="Mm?"))))
    _, sessions = await talk(link, realtime(1.0, 1.5, 1.0, 4.0), config=offering(toolbox),
                             toolbox=toolbox)
    [result] = sessions.of_type(StoreToolResult)
    assert result.status == "ok" and head.finished == [{"degrees": -90}]
    assert [o["output"] for o in link.outputs()] == ["turned to -90"]
    texts = assistant_texts(sessions)
    assert "Mm?" in texts and any("(tool turn_head said: turned to -90)" in t for t in texts)
    assert not [e for e in sessions.of_type(StoreError)]


async def test_end_conversation_in_a_replay_hangs_up_and_the_file_talks_on_in_a_new_session(
    autojump_clock
) -> None:
    toolbox = Toolbox(BUILTINS)
    link = LocalLink(script=Script((turn(say="hi"), turn("end_conversation", "Bye then."))))
    ctx, sessions = await talk(link, fast(1.0, 1.5, 1.0, 1.5, 1.0, 1.5),
                               config=offering(toolbox), toolbox=toolbox)
    assert ctx.session_ids == ["s0", "s1"]
    assert sessions.rows["s1"]["previous"] is None  # a new conversation, not a reconnect
    assert link.of_type("conversation.item.create", 1) == []  # with no context carried
    said = [(sid, m.role, m.text) for sid, m in sessions.messages()]
    assert [t[1:] for t in said if t[0] == "s0"][-2:] == [
        ("assistant", "Bye then."),
        ("assistant", "*beep* (tool end_conversation said: ok: say a short goodbye now; the "
                      "conversation ends after it)")]  # the goodbye, then the hang-up
    assert [t[1:] for t in said if t[0] == "s1"] == [("user", "(speech, 1.0 s)"),
                                                     ("assistant", "hi")]
    assert not sessions.of_type(StoreError) and ctx.stats.reconnects == 0


async def test_a_tool_outlives_a_lost_link_its_result_recorded_not_delivered(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = SlowHead(monkeypatch, seconds=3.0)
    link = LocalLink(script=Script((turn("turn_head", degrees=5),)),
                     faults=Faults(abort_after_responses=1))
    ctx, sessions = await talk(link, realtime(1.0, 5.0), config=offering(head.toolbox),
                               toolbox=head.toolbox)
    assert link.connections == 2 and ctx.stats.reconnects == 1
    # the dome finished turning although the link dropped under it; the audit has its result
    # under the session that asked, and no later session was sent an output it never asked for
    assert head.finished == [{"degrees": 5}] and link.outputs() == []
    results = [(sid, r.status) for sid, r in sessions.records if isinstance(r, StoreToolResult)]
    assert results == [("s0", "ok")]


async def test_a_tool_still_running_when_the_run_stops_is_stopped_and_recorded(
    autojump_clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = SlowHead(monkeypatch, seconds=60.0)
    link = LocalLink(script=Script((turn("turn_head", degrees=5),)))
    stopper = Stopper()

    async def stop_soon() -> None:
        await trio.sleep(5.0)
        stopper.stop("signal")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_soon)
        _, sessions = await talk(link, realtime(1.0, 30.0), config=offering(head.toolbox),
                                 toolbox=head.toolbox, stopper=stopper)
    assert trio.current_time() < 10.0 and head.finished == []
    [result] = sessions.of_type(StoreToolResult)
    assert (result.status, result.output) == (
        "error", "stopped before it finished: the conversation ended")


class LiveTurns:
    """A live source (drops when full, like capture): tones and pauses, then silence."""

    live = True
    resends = False

    def __init__(self, *parts: float) -> None:
        self.data = speech(*parts).astype("<i2").tobytes()
        self.frames_dropped = 0

    def set_urgent(self, urgent: bool) -> None:
        pass

    async def run(self, send: trio.MemorySendChannel[bytes], ctx: Any) -> None:
        async with send:
            start = trio.current_time()
            for i in range(len(self.data) // FRAME_BYTES):
                await trio.sleep_until(start + i * 0.02)
                try:
                    send.send_nowait(self.data[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
                except trio.WouldBlock:
                    self.frames_dropped += 1


async def test_end_conversation_live_keeps_no_session_until_someone_speaks(
    autojump_clock
) -> None:
    toolbox = Toolbox(BUILTINS)
    link = LocalLink(script=Script((turn("end_conversation", "Bye."),)))
    # a turn, 20 s of silence, a turn
    _, sessions = await talk(link, LiveTurns(1.0, 20.0, 1.2, 3.0), config=offering(toolbox),
                             toolbox=toolbox, policy=LinkPolicy(duplex="full"),
                             buffer=PlayoutBuffer(clock=trio.current_time))
    assert link.connections == 2
    # the second session opened only when the speech at 21 s began, not during the silence
    assert 21.0 <= link.opened[1] - link.opened[0] < 21.5
    said = [(sid, m.role, m.text) for sid, m in sessions.messages()]
    # the speech that woke it was heard whole (one user turn of its full length), answered
    assert [t[1:] for t in said if t[0] == "s1"][:2] == [("user", "(speech, 1.2 s)"),
                                                         ("assistant", "Bye.")]
    assert sessions.rows["s1"]["previous"] is None and not sessions.of_type(StoreInterrupted)
    assert not sessions.of_type(StoreError)


# --------------------------------------------------------------------------- end to end

TOOL = """#!/bin/sh
# records its stdin, answers on stdout
cat >> "{log}"
echo "turned to -90"
"""
SLOW = """#!/bin/sh
sleep 30
"""


def tools_file(tmp_path: Path) -> Path:
    log = tmp_path / "stdin.log"
    for name, body in (("head.sh", TOOL.format(log=log)), ("slow.sh", SLOW)):
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    path = tmp_path / "tools.toml"
    path.write_text(f"""
builtins = ["get_time"]

[[tool]]
name = "turn_head"
description = "Turn the dome."
command = ["{tmp_path / 'head.sh'}"]
[tool.parameters]
type = "object"
required = ["degrees"]
[tool.parameters.properties.degrees]
type = "integer"

[[tool]]
name = "wave"
description = "Wave the arm (slowly)."
command = ["{tmp_path / 'slow.sh'}"]
timeout_s = 1
[tool.parameters]
type = "object"
""")
    return path


async def test_tools_end_to_end_with_the_cli_real_processes_and_the_audit_trail(
    tmp_path: Path
) -> None:
    wav = tmp_path / "four.wav"
    sf.write(wav, speech(1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0, 1.5), 24000)
    script = Script((turn("turn_head", "Turning.", degrees=-90), turn("turn_head", degrees="x"),
                     turn("fly"), turn("wave")))
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20, script=script) as url:
        r = await cli("replay", str(wav), "--backend", "local", "--url", url, "--db", str(db),
                      "--tools", str(tools_file(tmp_path)), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    # the valid call ran once, with its arguments as one line of JSON on stdin
    assert (tmp_path / "stdin.log").read_text() == '{"degrees": -90}\n'
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, status, output FROM tool_executions ORDER BY seq").fetchall()
    texts = [t for (t,) in con.execute("SELECT text FROM messages WHERE role = 'assistant' "
                                       "ORDER BY seq")]
    con.close()
    assert [(name, status) for name, status, _ in rows] == [
        ("turn_head", "ok"), ("turn_head", "rejected"), ("fly", "rejected"), ("wave", "timeout")]
    assert rows[0][2] == "turned to -90" and rows[1][2].startswith("invalid arguments:")
    assert "does not exist" in rows[2][2] and "timed out" in rows[3][2]
    # each output reached the model: its next reply quotes it
    for _, _, output in rows:
        assert any(output[:40] in t for t in texts), output


async def test_end_conversation_and_set_volume_end_to_end(tmp_path: Path) -> None:
    """Turn 1 sets the volume (kept next to the database), turn 2 says goodbye and hangs up;
    the replay ends normally."""
    tools = tmp_path / "tools.toml"
    tools.write_text('builtins = ["set_volume", "end_conversation"]\n')
    script = Script((turn("set_volume", percent=40), turn("end_conversation", "Goodbye!")))
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20, script=script) as url:
        r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--backend", "local", "--url",
                      url, "--db", str(db), "--tools", str(tools), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((tmp_path / "tool_state.json").read_text()) == {"volume_percent": 40}
    con = sqlite3.connect(db)
    sessions = con.execute("SELECT id, previous_session_id, ended_at FROM sessions "
                           "ORDER BY started_at, id").fetchall()
    said = [t for (t,) in con.execute("SELECT text FROM messages WHERE role = 'assistant' AND "
                                      "session_id = ? ORDER BY seq", (sessions[0][0],))]
    errors = con.execute("SELECT type FROM errors").fetchall()
    con.close()
    assert said[-2:] == ["Goodbye!", "*beep* (tool end_conversation said: ok: say a short "
                                     "goodbye now; the conversation ends after it)"]
    # hung up: the rest of the file went to a new conversation, nothing was lost or failed
    assert len(sessions) == 2 and sessions[1][1] is None and all(s[2] for s in sessions)
    assert errors == []
    assert "Goodbye!" in r.stdout.decode()


class _Offer:
    """The run's tools on offer, changed by hand (an MCP server coming and going)."""

    def __init__(self) -> None:
        self.version, self.tools = 0, ()
        self._event = trio.Event()

    def session_tools(self) -> tuple[dict[str, Any], ...]:
        return self.tools

    async def changed(self, since: int) -> None:
        while self.version == since:
            await self._event.wait()

    def heard(self, text: str, seq: int | None) -> None:
        pass

    def change(self, *names: str) -> None:
        self.tools = tuple({"type": "function", "name": n} for n in names)
        self.version += 1
        self._event.set()
        self._event = trio.Event()


async def test_the_runner_hands_the_link_each_change_of_the_offer_and_ends_with_the_calls(
) -> None:
    offer = _Offer()
    calls_send, calls_recv = trio.open_memory_channel[ToolJob](1)
    results_send, results_recv = trio.open_memory_channel[ToolNews](4)
    records_send, _records_recv = trio.open_memory_channel[tuple[str, Record]](4)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ToolRunner(no_tools, records_send, offer).run, calls_recv,
                               results_send)
            await trio.testing.wait_all_tasks_blocked()
            offer.change("home__set_light")
            assert await results_recv.receive() == ToolsOffered(
                ({"type": "function", "name": "home__set_light"},))
            offer.change()
            assert await results_recv.receive() == ToolsOffered(())
            await calls_send.aclose()  # the conversation is over: the runner ends, watch too
        with pytest.raises(trio.EndOfChannel):
            await results_recv.receive()
