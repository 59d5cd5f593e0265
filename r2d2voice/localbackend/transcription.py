"""A committed user turn on the wire: the item, and its transcription now or later (sans-IO).

With no faults the ``.completed`` transcription follows ``conversation.item.done`` at once (and
the item carries the transcript). With :attr:`Faults.transcript_delay` the service's habit: the
item is done without a transcript, ``.delta`` events follow at once, and ``.completed`` comes
later (:class:`Deferred`). :attr:`Faults.transcript_outcome` makes it fail, be empty or never
come.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r2d2voice.localbackend.fault_events import obfuscation, transcription_failed
from r2d2voice.localbackend.faults import Faults, TranscriptDelay
from r2d2voice.localbackend.items import Conversation, Item
from r2d2voice.localbackend.wire import EventMaker, Json

__all__ = ["Deferred", "commit_events"]


@dataclass
class Deferred:
    """Events due ``when``: after the next reply's ``response.created`` or ``response.done``, or
    that many seconds from now."""

    when: TranscriptDelay
    events: list[Json] = field(default_factory=list)


def _usage(item: Item, transcript: str) -> Json:
    audio_tokens = item.audio_ms * 10 // 1000
    text_tokens = len(transcript) // 4
    return {"type": "tokens", "input_tokens": audio_tokens, "output_tokens": text_tokens,
            "total_tokens": audio_tokens + text_tokens,
            "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0}}


def commit_events(
    ev: EventMaker, conversation: Conversation, item: Item, previous: str | None,
    speech_ms: int, transcribe: bool, faults: Faults, words: str | None = None,
) -> tuple[list[Json], Deferred | None]:
    """The events of committing ``item`` (already in ``conversation`` after ``previous``): now,
    and the transcription due later (None: nothing deferred). ``words``: the transcript
    (a script's ``hear``) instead of ``(speech, N s)``."""
    now = [ev("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id),
           ev("conversation.item.added", previous_item_id=previous, item=conversation.wire(item))]
    if not transcribe:
        now.append(ev("conversation.item.done", previous_item_id=previous,
                      item=conversation.wire(item)))
        return now, None
    outcome = faults.transcript_outcome
    heard = words if words is not None else f"(speech, {speech_ms / 1000:.1f} s)"
    transcript = "" if outcome == "empty" else heard
    if outcome in ("completed", "empty"):
        item.text = transcript or None
        item.wire["content"][0]["transcript"] = transcript
    if faults.transcript_delay is None:
        now.append(ev("conversation.item.done", previous_item_id=previous,
                      item=conversation.wire(item)))
        return now + _final(ev, item, transcript, outcome), None
    wire = conversation.wire(item)
    wire["content"][0]["transcript"] = None  # done before it is transcribed
    now.append(ev("conversation.item.done", previous_item_id=previous, item=wire))
    if outcome == "completed":
        words = transcript.split(" ")
        for delta in [w + " " for w in words[:-1]] + words[-1:]:
            extra = {"obfuscation": obfuscation(delta)} if faults.extra_fields else {}
            now.append(ev("conversation.item.input_audio_transcription.delta", item_id=item.id,
                          content_index=0, delta=delta, **extra))
    later = _final(ev, item, transcript, outcome)
    return now, (Deferred(faults.transcript_delay, later) if later else None)


def _final(ev: EventMaker, item: Item, transcript: str, outcome: str) -> list[Json]:
    if outcome == "never":
        return []
    if outcome == "failed":
        return [transcription_failed(ev, item.id)]
    return [ev("conversation.item.input_audio_transcription.completed", item_id=item.id,
               content_index=0, transcript=transcript, usage=_usage(item, transcript))]
