"""The local backend bills as the service does: every response reads the whole context again,
the part the previous response read comes back as cached, and the session's ``truncation``
drops old turns (and with them the cached prefix). Sans-IO, every event checked against the
SDK's schema (tests/localpeer.py)."""

from __future__ import annotations

import itertools
from typing import Any

from localpeer import Peer, turn_audio

from r2d2voice.localbackend.context import AUTO_LIMIT

Json = dict[str, Any]
INSTRUCTIONS = "You are R2. Beep."


def talk(p: Peer, turns: int) -> list[Json]:
    """``turns`` spoken turns, each answered in full; the usage of every response."""
    out = []
    for k in range(turns):
        p.append(turn_audio(1.0, freq=300.0 + 40 * k))
        done = p.stream()[-1]
        assert done["type"] == "response.done" and done["response"]["status"] == "completed"
        out.append(done["response"]["usage"])
    return out


def peer(truncation: Any = None) -> Peer:
    p = Peer(reply_seconds=1.0)
    session: Json = {"type": "realtime", "instructions": INSTRUCTIONS}
    if truncation is not None:
        session["truncation"] = truncation
    [updated] = p.send("session.update", session=session)
    assert updated["type"] == "session.updated"
    return p


def details(usage: Json) -> tuple[int, int, int, int]:
    d = usage["input_token_details"]
    c = d["cached_tokens_details"]
    assert d["cached_tokens"] == c["audio_tokens"] + c["text_tokens"]
    assert usage["input_tokens"] == d["audio_tokens"] + d["text_tokens"]
    return d["audio_tokens"], d["text_tokens"], c["audio_tokens"], c["text_tokens"]


def test_each_response_reads_the_whole_conversation_and_the_prefix_comes_back_cached() -> None:
    usages = talk(peer(), 6)
    inputs = [u["input_tokens"] for u in usages]
    assert inputs == sorted(inputs) and len(set(inputs)) == 6  # grows turn by turn
    first = details(usages[0])
    assert first[2:] == (0, 0)  # nothing read before the first response
    assert first[1] == len(INSTRUCTIONS) // 4
    for before, now in itertools.pairwise(usages):
        audio, text, cached_audio, cached_text = details(now)
        b_audio, b_text, _, _ = details(before)
        # cached: exactly what the previous response read
        assert (cached_audio, cached_text) == (b_audio, b_text)
        # new: the previous reply (20 audio tokens for its 1 s, its transcript as text) and
        # the person's new turn (10 tokens a second)
        out = before["output_token_details"]
        assert text - b_text == out["text_tokens"]
        new_user = audio - b_audio - out["audio_tokens"]
        assert new_user == first[0]  # the same length of speech every turn
    # the bill grows: turn 6 reads 6 turns, mostly from the cache
    assert inputs[-1] > 5 * inputs[0]
    assert usages[-1]["input_token_details"]["cached_tokens"] > 0.7 * inputs[-1]


def test_retention_ratio_truncation_bounds_the_context_and_restarts_the_cache() -> None:
    limit = 150  # tokens after the instructions: about three turns
    usages = talk(peer({"type": "retention_ratio", "retention_ratio": 0.5,
                        "token_limits": {"post_instructions": limit}}), 12)
    head = len(INSTRUCTIONS) // 4
    posts = [u["input_tokens"] - head for u in usages]
    assert max(posts) <= limit  # never more than the limit after the instructions
    truncated = [k for k in range(1, 12) if posts[k] < posts[k - 1]]
    assert len(truncated) >= 2, posts  # it dropped old turns more than once
    for k in truncated:
        # down to at most half the limit, and the cache holds only the instructions then
        assert posts[k] <= 0.5 * limit
        assert details(usages[k])[2:] == (0, head)
    for k in range(1, 12):
        if k not in truncated:  # between truncations the previous input is cached again
            assert details(usages[k])[2] + details(usages[k])[3] == usages[k - 1]["input_tokens"]


def test_disabled_never_truncates_and_auto_only_past_the_model_limit() -> None:
    for truncation in ("disabled", "auto", None):
        usages = talk(peer(truncation), 4)
        inputs = [u["input_tokens"] for u in usages]
        assert inputs == sorted(inputs) and inputs[-1] < AUTO_LIMIT


def test_a_dropped_turn_is_no_longer_read_but_can_still_be_deleted() -> None:
    p = peer({"type": "retention_ratio", "retention_ratio": 0.3,
              "token_limits": {"post_instructions": 60}})
    talk(p, 4)
    dropped = sorted(p.session.window.dropped)
    assert dropped
    [deleted] = p.send("conversation.item.delete", item_id=dropped[0])
    assert deleted["type"] == "conversation.item.deleted"
