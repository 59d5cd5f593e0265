"""Bounded bookkeeping for the sans-IO core: a long run must not grow its state."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: ids remembered per kind (items, responses, events, calls); the oldest are forgotten
MAX_TRACKED = 256


def remember(d: OrderedDict[str, Any], key: str, value: Any, bound: int = MAX_TRACKED) -> None:
    """``d[key] = value`` as the newest entry; drop the oldest beyond ``bound``."""
    d[key] = value
    d.move_to_end(key)
    while len(d) > bound:
        d.popitem(last=False)
