"""Confirmation the appliance enforces: a ``confirm`` tool's call is held until the person's
next utterance, and runs only if that utterance is a yes.

:func:`classify` is a small yes/no classifier over the user's transcript (English): a yes is a
short utterance that *starts* with a yes ("yes", "yeah, go ahead", "ok do it") and holds no no;
any negation anywhere ("yes — no, wait", "don't") is a no; anything else ("what time is it?",
"ok, what's the weather?", a long new request) is a change of subject. Only a yes runs the
tool: a no, a change of subject or silence for ``WINDOW_S`` reject it. :class:`Confirmations`
holds the calls waiting for an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import trio

Verdict = Literal["yes", "no", "other", "silence"]
#: the person has this long after the call was held to answer, else it is rejected
WINDOW_S = 30.0

_YES = ("yes", "yeah", "yea", "yep", "yup", "ya", "sure", "ok", "okay", "alright",
        "all right", "affirmative", "correct", "right", "absolutely", "definitely",
        "of course", "please do", "go ahead", "go for it", "do it", "confirm",
        "confirmed", "i confirm", "that's right", "that is right", "indeed", "certainly")
_NO = ("no", "nope", "nah", "not", "don't", "dont", "do not", "never", "stop", "cancel",
       "wait", "hold on", "negative", "never mind", "nevermind", "abort", "not now", "no way",
       "wrong", "isn't", "shouldn't", "can't", "won't")
#: words a person may say before the yes ("uh, yes", "well ok", "r2, go ahead")
_FILLERS = {"uh", "um", "er", "erm", "hm", "hmm", "well", "oh", "ah", "so", "r2", "robot",
            "and", "then"}
#: after the yes, a question or a long new request is a change of subject ("ok, what time is
#: it?"), not a yes
_QUESTIONS = {"what", "what's", "whats", "when", "where", "who", "why", "how", "which"}
_MAX_AFTER = 6
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _has(words: list[str], phrase: str, at: int | None = None) -> bool:
    want = phrase.split()
    if at is not None:
        return words[at:at + len(want)] == want
    return any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


def classify(text: str) -> Literal["yes", "no", "other"]:
    """``yes``, ``no`` or ``other`` (a change of subject) for one utterance."""
    words = _words(text)
    if any(_has(words, phrase) for phrase in _NO) or any(w.endswith("n't") for w in words):
        return "no"
    start = 0
    while start < len(words) and words[start] in _FILLERS:
        start += 1
    said = next((p for p in sorted(_YES, key=len, reverse=True) if _has(words, p, start)), None)
    if said is None:
        return "other"
    rest = words[start + len(said.split()):]
    if len(rest) > _MAX_AFTER or _QUESTIONS & set(rest):
        return "other"
    return "yes"


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    text: str = ""

    def refusal(self, window_s: float) -> str:
        """What the model is told when the call did not run."""
        if self.verdict == "no":
            return f"not run: the person said no ({self.text!r})"
        if self.verdict == "silence":
            return f"not run: the person did not answer within {window_s:g} s"
        return (f"not run: the person's next words were not a yes ({self.text!r}); ask again "
                "if they still want it")


@dataclass
class Hold:
    """A call waiting for the person: answered by the first utterance after ``after_seq``
    (its own place in the conversation: a late transcript of what asked for it is no answer)."""

    after_seq: int | None
    decided: trio.Event = field(default_factory=trio.Event)
    answer: Answer | None = None


class Confirmations:
    """The calls waiting for a yes; :meth:`heard` is told every final user transcript."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._holds: list[Hold] = []

    @property
    def waiting(self) -> int:
        return len(self._holds)

    def hold(self, after_seq: int | None) -> Hold:
        """Start waiting (before the model is told to ask, so no answer is missed)."""
        hold = Hold(after_seq)
        self._holds.append(hold)
        return hold

    def heard(self, text: str, seq: int | None = None) -> None:
        """The person said ``text`` (a final transcript, item ``seq``): it answers every hold
        made before it."""
        for hold in list(self._holds):
            if hold.after_seq is not None and seq is not None and seq <= hold.after_seq:
                continue
            hold.answer = Answer(classify(text), text.strip())
            hold.decided.set()
            self._holds.remove(hold)

    async def wait(self, hold: Hold) -> Answer:
        """The answer, or ``silence`` after ``window_s`` (counted from now)."""
        try:
            with trio.move_on_after(self.window_s):
                await hold.decided.wait()
        finally:
            if hold in self._holds:
                self._holds.remove(hold)
        return hold.answer or Answer("silence")


def ask_text(name: str, arguments: str) -> str:
    """What the model is told while a call waits for the person's yes."""
    return (f"[appliance] The tool call {name}({arguments}) needs the person's spoken "
            "confirmation before it runs. Ask them now, in one short question, whether to do "
            "it. It runs only if their very next words are a yes; do not call it again.")
