"""What a long conversation's turns cost: turn 60 against turn 1, with and without truncation.

The Realtime service bills the whole context again at every response (cached input at the cached
price), so a long conversation's turns get dearer. The local backend bills the same way
(``r2d2voice/localbackend/context.py``): this script talks ``--turns`` turns to its sans-IO
session (``--user-s`` of speech, ``--reply-s`` of reply per turn), prices every
``response.done`` as ``r2d2voice usage`` would (``R2D2_PRICE_*`` defaults) and prints, per
truncation setting:

    truncation                      turn 1  turn 60  60/1  max (turn)    last 10 /1  60 turns
    disabled                        0.0118   0.0279  2.4x  0.0279 (60)   2.3x        1.1823

Two price columns: with the cache as the service reports it, and with no cache hits at all
(the service gives no guarantee: a cache can be evicted between turns minutes apart).

Usage: python bench/cost.py [--turns 60] [--user-s 3] [--reply-s 6]
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
from typing import Any

import numpy as np

from r2d2voice.localbackend.reply import Reply, synthesize
from r2d2voice.localbackend.session import LocalSession
from r2d2voice.localbackend.wire import RATE, CountingIds
from r2d2voice.reports.budget import response_cost
from r2d2voice.reports.usage import Prices
from r2d2voice.system.config import default

FRAME = 480 * 10  # 200 ms per append (as the uplink batches)
INSTRUCTIONS = default("instructions")


def retention(ratio: float, limit: int) -> dict[str, Any]:
    return {"type": "retention_ratio", "retention_ratio": ratio,
            "token_limits": {"post_instructions": limit}}


SETTINGS: list[tuple[str, Any]] = [
    ("disabled", "disabled"),
    ("auto (the model's limit)", "auto"),
    (f"retention {default('truncation_ratio')} @ {default('context_token_limit')} (defaults)",
     retention(default("truncation_ratio"), default("context_token_limit"))),
    ("retention 0.5 @ 4000", retention(0.5, 4000)),
    ("retention 0.5 @ 2000", retention(0.5, 2000)),
]


def turn_audio(speech_s: float, k: int) -> np.ndarray:
    """0.5 s of silence, ``speech_s`` of a tone (a different one each turn), 1 s of silence."""
    t = np.arange(round(speech_s * RATE)) / RATE
    tone = 0.1 * 32768 * np.sin(2 * np.pi * (300 + 7 * k) * t)
    pcm = np.concatenate([np.zeros(RATE // 2), tone, np.zeros(RATE)])
    return np.round(pcm).astype(np.int16)


def conversation(truncation: Any, turns: int, user_s: float,
                 reply_s: float) -> list[dict[str, Any]]:
    """The usage of every response of a ``turns``-turn conversation."""
    session = LocalSession("gpt-realtime", clock=lambda: 0.0, new_id=CountingIds(),
                           reply_seconds=reply_s)
    session.receive(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "instructions": INSTRUCTIONS, "truncation": truncation}}))
    usages = []
    for k in range(turns):
        replies: list[Reply] = []
        pcm = turn_audio(user_s, k)
        for i in range(0, len(pcm), FRAME):
            audio = base64.b64encode(pcm[i:i + FRAME].astype("<i2").tobytes()).decode()
            out = session.receive(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": audio}))
            replies += [o for o in out if isinstance(o, Reply)]
        assert len(replies) == 1, f"turn {k + 1}: {len(replies)} replies"
        reply = replies[0]
        for step in (*reply.opening(), *reply.steps(synthesize(reply.seed, reply.seconds), 100)):
            if isinstance(step, dict):
                reply.sent(step)
        done = reply.closing()
        session.finish_reply(reply)
        [usage] = [e["response"]["usage"] for e in done if e["type"] == "response.done"]
        usages.append(usage)
    return usages


def row(name: str, costs: list[float]) -> str:
    first, last = costs[0], costs[-1]
    top = max(range(len(costs)), key=costs.__getitem__)
    tail = sum(costs[-10:]) / len(costs[-10:])
    return (f"{name:<34} {first:8.4f} {last:8.4f} {last / first:5.1f}x "
            f"{costs[top]:8.4f} ({top + 1:>2})  {tail / first:5.1f}x  {sum(costs):8.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--user-s", type=float, default=3.0, help="speech per turn, seconds")
    ap.add_argument("--reply-s", type=float, default=6.0, help="reply per turn, seconds")
    args = ap.parse_args()
    prices = Prices()
    no_cache = Prices(audio_in_cached=prices.audio_in, text_in_cached=prices.text_in)
    n = args.turns
    print(f"{n} turns: {args.user_s:g} s of speech, {args.reply_s:g} s of reply each; "
          f"USD per turn at the default R2D2_PRICE_* (cached in {prices.audio_in_cached:g}, "
          f"audio in {prices.audio_in:g}, audio out {prices.audio_out:g} per 1M)")
    head = (f"{'truncation':<34} {'turn 1':>8} {'turn ' + str(n):>8} {str(n) + '/1':>6} "
            f"{'max (turn)':>13}  {'last10/1':>6}  {str(n) + ' turns':>8}")
    results = [(name, conversation(t, n, args.user_s, args.reply_s)) for name, t in SETTINGS]
    for title, p in (("with the cache the service reports", prices),
                     ("with no cache hits", no_cache)):
        print(f"\n{title}\n{head}")
        for name, usages in results:
            print(row(name, [response_cost(u, p) for u in usages]))
    print("\ninput tokens of the last turn, cached share, truncations:")
    for name, usages in results:
        last = usages[-1]
        posts = [u["input_tokens"] for u in usages]
        cuts = sum(1 for a, b in itertools.pairwise(posts) if b < a)
        cached = last["input_token_details"]["cached_tokens"]
        print(f"  {name:<34} {last['input_tokens']:>6} in, {cached / last['input_tokens']:4.0%}"
              f" cached, {cuts} truncation{'s' if cuts != 1 else ''}")


if __name__ == "__main__":
    main()
