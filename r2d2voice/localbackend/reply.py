"""One response: its output items, what of it was sent, and how it ends (sans-IO).

The shell streams a :class:`Reply` in three steps: :meth:`Reply.opening` (``response.created``
and any deferred events due then), :meth:`Reply.steps` over the audio from :func:`synthesize`
(paced by :class:`Tick` markers), reporting every event it sent with :meth:`Reply.sent`; at
the end, or once cancelled, :meth:`Reply.closing` closes whatever was opened, from what was
actually sent, then ``response.done`` and what is due after it.

A reply is an audio message (beeps, with a scripted or default transcript), a function call,
or both (a spoken preamble, then the call); a remote MCP call the service made comes before
the message about it, an approval request after a preamble.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Container, Iterator
from typing import Any

from r2d2voice.audio.beeps import r2_reply
from r2d2voice.localbackend.context import Bill
from r2d2voice.localbackend.fault_events import rate_limits_updated, response_status_details
from r2d2voice.localbackend.faults import ResponseFault
from r2d2voice.localbackend.items import Conversation
from r2d2voice.localbackend.outputs import (
    ARGUMENT_PIECE,
    AudioMessage,
    ChunkMs,
    FunctionCall,
    McpOutput,
    Tick,
    chunk_bounds,
)
from r2d2voice.localbackend.planner import ReplyPlan
from r2d2voice.localbackend.wire import RATE, EventMaker, Json, ms

__all__ = ["Beeps", "Reply", "Tick", "leftover_audio", "synthesize"]

Beeps = tuple[bytes, str]
"""A reply's PCM16 audio and its transcript."""

REASONING_TOKENS = 8
"""Reasoning tokens every response reports with ``extra_fields`` (counted in output_tokens)."""


@functools.lru_cache(maxsize=16)
def synthesize(seed: bytes, seconds: float) -> Beeps:
    """The beeps for ``seed`` (cached: the same input gets the same reply, computed once).

    numpy work of ~0.6 ms per second of audio on a desktop core, tens of ms on a small board:
    the server runs it in a worker thread.
    """
    audio, transcript = r2_reply(seed, seconds, RATE)
    return audio.astype("<i2").tobytes(), transcript


def leftover_audio(steps: Iterator[Json | Tick], n: int) -> list[Json]:
    """Up to ``n`` audio deltas still to come in ``steps`` (what the service sends after it
    cancels a reply: the item does not hold them)."""
    out: list[Json] = []
    for step in steps if n > 0 else ():
        if isinstance(step, Tick) or step["type"] == "response.output_audio_transcript.delta":
            continue
        if step["type"] != "response.output_audio.delta":
            break
        out.append(step)
        if len(out) == n:
            break
    return out


class Reply:
    """One response, from ``response.created`` to ``response.done``.

    ``plan``: what it says and calls (:class:`ReplyPlan`); ``fault``: how it is made to end
    (:attr:`Faults.fail_responses`); ``extra``: the fields of :attr:`Faults.extra_fields`;
    ``bill``: the input it is billed for, read when it closes (its own outputs excluded; see
    :mod:`.context`).
    """

    def __init__(
        self,
        event: EventMaker,
        conversation: Conversation,
        *,
        conversation_id: str,
        voice: Any,
        instructions: str,
        seed: bytes,
        seconds: float,
        metadata: Any = None,
        plan: ReplyPlan | None = None,
        fault: ResponseFault | None = None,
        extra: bool = False,
        rate_limits: bool = False,
        bill: Callable[[Container[str]], Bill] | None = None,
    ) -> None:
        self._event = event
        self._conversation = conversation
        self.id = event.new_id("resp")
        self.conversation_id = conversation_id
        self.voice = voice
        self.instructions = instructions
        self.seed = seed
        self.seconds = seconds
        self.metadata = metadata
        plan = plan or ReplyPlan()
        say, call, mcp = plan.say, plan.call, plan.mcp
        self.say = say
        self.fault = fault
        self.extra = extra
        self.rate_limits = rate_limits
        self.bill = bill
        self.cancel_reason: str | None = None
        self.created = False
        self.on_start: list[Json] = []  # sent right after response.created
        self.on_done: list[Json] = []  # sent right after response.done
        self._start_sent: set[str] = set()
        common = (event, conversation, self.id)
        self.message: AudioMessage | None = None
        self.call: FunctionCall | None = None
        self.outputs: list[AudioMessage | FunctionCall | McpOutput] = []
        asks = mcp is not None and mcp.ask
        if mcp is not None and not asks:  # the call the service made, then the words on it
            self.outputs.append(McpOutput(*common, 0, extra=extra, plan=mcp.plan, ask=False,
                                          approval_request_id=mcp.approval_request_id))
        if say is not None or (call is None and not asks):
            phase = "commentary" if call is not None or asks else "final_answer"
            self.message = AudioMessage(*common, len(self.outputs), extra=extra, phase=phase)
            self.outputs.append(self.message)
        if call is not None:
            self.call = FunctionCall(*common, len(self.outputs), extra=extra, name=call[0],
                                     arguments=call[1])
            self.outputs.append(self.call)
        if mcp is not None and asks:
            self.outputs.append(McpOutput(*common, len(self.outputs), extra=extra,
                                          plan=mcp.plan, ask=True))

    @property
    def speaks(self) -> bool:
        """Whether the reply has audio (the shell synthesizes beeps only then)."""
        return self.message is not None

    @property
    def item_id(self) -> str:
        return self.outputs[0].item_id

    @property
    def bytes_sent(self) -> int:
        return self.message.bytes_sent if self.message else 0

    @property
    def status(self) -> str:
        if self.cancel_reason is not None or self.fault == "turn_detected":
            return "cancelled"
        if self.fault == "failed":
            return "failed"
        if self.fault is not None:
            return "incomplete"
        return "completed"

    def cancel(self, reason: str) -> None:
        """From now on the reply is cancelled (``turn_detected`` or ``client_cancelled``)."""
        self.cancel_reason = reason

    # -- events ------------------------------------------------------------------------

    def opening(self) -> Iterator[Json]:
        """``response.created``, then the events due once the reply has started."""
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield from self.on_start

    def steps(self, beeps: Beeps | None, chunk_ms: ChunkMs) -> Iterator[Json | Tick]:
        """Every output item: opened, streamed; all but the last closed (the last is closed
        by :meth:`closing`). A fault that cuts the reply stops it halfway."""
        if self.fault == "failed":
            return
        cut = self.fault is not None
        for k, out in enumerate(self.outputs):
            yield from out.opening()
            if isinstance(out, AudioMessage):
                assert beeps is not None
                audio, default = beeps
                n = len(chunk_bounds(len(audio) // 2, chunk_ms))
                ticks = 0
                for step in out.chunks(audio, default if self.say is None else self.say,
                                       chunk_ms):  # lazily: a cancel stops making events
                    if isinstance(step, Tick):
                        if cut and ticks == n // 2:
                            break
                        ticks += 1
                    yield step
                if not cut and k < len(self.outputs) - 1:
                    yield Tick(ms(len(audio) // 2))  # what follows is due after the audio
            elif isinstance(out, FunctionCall):
                n = math.ceil(len(out.arguments) / ARGUMENT_PIECE)
                yield from itertools.islice(out.deltas(), n // 2 if cut else None)
            elif not cut:
                yield from out.steps()
            if cut:
                return
            if k < len(self.outputs) - 1:
                yield from out.closing("completed")

    def sent(self, event: Json) -> None:
        """``event`` (from :meth:`opening` or :meth:`steps`) went out: the client knows it."""
        if event["type"] == "response.created":
            self.created = True
            return
        self._start_sent.add(event["event_id"])
        for out in self.outputs:
            if event.get("item_id", event.get("item", {}).get("id")) == out.item_id:
                out.sent(event)

    def closing(self) -> list[Json]:
        """What ends the response, given what was sent: the missing opening, the ``done`` of
        each output opened, ``response.done`` with usage, then what is due after it."""
        out: list[Json] = []
        if not self.created:
            out.append(self._event("response.created",
                                   response=self._response("in_progress", [], None)))
        out += [e for e in self.on_start if e["event_id"] not in self._start_sent]
        status = self.status
        for o in self.outputs:
            out += o.closing("completed" if status == "completed" else "incomplete")
        output = [o.wire(o.status) for o in self.outputs if o.started]
        usage = self.usage()
        out.append(self._event("response.done", response=self._response(status, output, usage)))
        if self.rate_limits:
            out.append(rate_limits_updated(self._event, usage["total_tokens"]))
        return out + self.on_done

    def usage(self) -> Json:
        """Synthetic, deterministic usage: input and cached input as ``bill`` says (the
        whole context read again, see :mod:`.context`); output 20 audio tokens per second of
        audio sent, len(transcript and arguments sent) // 4 text tokens (+
        :data:`REASONING_TOKENS` with ``extra``). Called once, when the reply closes."""
        exclude = {o.item_id for o in self.outputs}
        bill = self.bill(exclude) if self.bill is not None else Bill(0, len(self.instructions) // 4)
        in_audio, in_text = bill.audio, bill.text
        out_audio = self.bytes_sent // 2 * 20 // RATE
        text = (self.message.transcript_sent if self.message else "") + (
            self.call.arguments_sent if self.call else "")
        out_text = len(text) // 4
        reasoning = REASONING_TOKENS if self.extra else 0
        cached_audio, cached_text = bill.cached_audio, bill.cached_text
        output_details: Json = {"text_tokens": out_text, "audio_tokens": out_audio}
        if self.extra:
            output_details["reasoning_tokens"] = reasoning
        return {
            "total_tokens": in_audio + in_text + out_audio + out_text + reasoning,
            "input_tokens": in_audio + in_text,
            "output_tokens": out_audio + out_text + reasoning,
            "input_token_details": {
                "text_tokens": in_text, "audio_tokens": in_audio, "image_tokens": 0,
                "cached_tokens": cached_audio + cached_text,
                "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio,
                                          "image_tokens": 0},
            },
            "output_token_details": output_details,
        }

    def _response(self, status: str, output: list[Json], usage: Json | None) -> Json:
        details = None
        if status != "in_progress":
            details = response_status_details(status, self.fault,
                                              self.cancel_reason or self.fault)
        return {
            "object": "realtime.response", "id": self.id, "status": status,
            "status_details": details, "output": copy.deepcopy(output),
            "conversation_id": self.conversation_id, "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE},
                                 "voice": copy.deepcopy(self.voice)}},
            "usage": usage, "metadata": self.metadata,
        }
