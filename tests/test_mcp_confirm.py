"""Confirmation the appliance enforces: a ``confirm`` tool's call is held, the model is told to
ask, and it runs only if the person's next utterance says yes. The classifier, then the hold
against a real MCP server (yes, no, a change of subject), then silence on the mock clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from mcp_support import calls, stdio_entry
from test_mcp_tools import READY_S, ready, toolbox

from r2d2voice.appliance.tools import ToolContext
from r2d2voice.appliance.tools.confirm import WINDOW_S, Confirmations, classify


@pytest.mark.parametrize("said", ["Yes.", "yes please", "Yeah, go ahead.", "uh, ok do it",
                                  "Sure!", "of course", "Yes please unlock the front door"])
def test_a_yes(said: str) -> None:
    assert classify(said) == "yes"


@pytest.mark.parametrize("said", ["No.", "nope", "Yes — no, wait!", "don't", "I don't think so",
                                  "cancel that", "not now"])
def test_a_no(said: str) -> None:
    assert classify(said) == "no"


@pytest.mark.parametrize("said", ["What time is it?", "ok, what's the weather?",
                                  "please tell me a joke", "(speech, 1.2 s)", "",
                                  "yes and then tell me a long story about the desert"])
def test_a_change_of_subject(said: str) -> None:
    assert classify(said) == "other"


class Asked:
    """The caller's side of a held call: what the model was told to ask."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.event = trio.Event()

    async def ask(self, text: str) -> None:
        self.prompts.append(text)
        self.event.set()


async def held_call(box: Any, name: str, arguments: str, answers: list[tuple[str, int]]
                    ) -> tuple[Any, Asked]:
    """Call ``name`` (at conversation place 10); once the model was told to ask, the person
    says ``answers`` (text, seq) one after another."""
    asked = Asked()
    result: list[Any] = []

    async def run() -> None:
        result.append(await box.call(name, arguments,
                                     context=ToolContext("c9", seq=10, ask=asked.ask)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(READY_S):
            await asked.event.wait()
        for text, seq in answers:
            box.heard(text, seq)
    return result[0], asked


async def test_a_confirm_tool_runs_only_after_a_yes_that_comes_after_it(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    box = toolbox(tmp_path, stdio_entry(log, extra='confirm = ["unlock_door"]'))
    async with box.running():
        await ready(box)
        # the late transcript of what asked for it (seq 9) is no answer; the yes (12) is
        result, asked = await held_call(box, "home__unlock_door", '{"door": "front"}',
                                        [("unlock the front door", 9), ("Yes, go ahead.", 12)])
        light = await box.call("home__set_light", '{"room": "hall", "on": true}',
                               context=ToolContext("c10"))
    assert (result.status, result.output) == ("ok", "the front door is unlocked")
    [prompt] = asked.prompts
    assert 'home__unlock_door({"door": "front"})' in prompt and "Ask them now" in prompt
    assert light.status == "ok"  # tools without confirm run at once
    assert [c["tool"] for c in calls(log)] == ["unlock_door", "set_light"]


@pytest.mark.parametrize(("said", "why"), [
    ("No, leave it locked.", "not run: the person said no ('No, leave it locked.')"),
    ("What's the weather like?", "not run: the person's next words were not a yes"),
])
async def test_a_no_or_a_change_of_subject_rejects_and_nothing_reaches_the_server(
        tmp_path: Path, said: str, why: str) -> None:
    log = tmp_path / "calls.log"
    box = toolbox(tmp_path, stdio_entry(log, extra='confirm = ["unlock_door"]'))
    async with box.running():
        await ready(box)
        result, _ = await held_call(box, "home__unlock_door", '{"door": "front"}',
                                    [(said, 11), ("yes", 12)])  # a later yes is too late
    assert result.status == "rejected" and result.output.startswith(why)
    assert calls(log) == []


async def test_silence_past_the_window_rejects(autojump_clock: trio.testing.MockClock,
                                               tmp_path: Path) -> None:
    """On the mock clock, with a remote server's confirm tool (the service's approval goes
    through the same policy; nothing to connect to here)."""
    box = toolbox(tmp_path, '[[mcp]]\nname = "shop"\nurl = "https://shop.example/mcp"\n'
                            'remote = true\nconfirm = ["buy"]\n')
    result, asked = await held_call(box, "shop__buy", '{"item": "milk"}', [])
    assert trio.current_time() == pytest.approx(WINDOW_S)
    assert (result.status, result.output) == (
        "rejected", f"not run: the person did not answer within {WINDOW_S:g} s")
    assert len(asked.prompts) == 1
    free = await box.call("shop__browse", "{}", context=ToolContext("c2"))
    assert free.status == "ok"  # a remote tool without confirm is approved at once


async def test_a_call_whose_caller_cannot_ask_is_rejected(tmp_path: Path) -> None:
    box = toolbox(tmp_path, '[[mcp]]\nname = "shop"\nurl = "https://shop.example/mcp"\n'
                            'remote = true\nconfirm = ["buy"]\n')
    result = await box.call("shop__buy", "{}", context=ToolContext("c1"))
    assert result.status == "rejected" and "cannot be asked for" in result.output


def test_only_an_utterance_after_the_call_answers_it() -> None:
    waiting = Confirmations()
    hold = waiting.hold(after_seq=3)
    waiting.heard("yes", 2)  # before the call: ignored
    assert waiting.waiting == 1 and not hold.decided.is_set()
    waiting.heard("yes", 4)
    assert waiting.waiting == 0 and hold.answer is not None and hold.answer.verdict == "yes"
