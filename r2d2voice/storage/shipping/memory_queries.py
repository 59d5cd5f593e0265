"""The robots' memory on the fleet server: remembered facts, and a search over facts and
conversations (PostgreSQL's full-text search, ``simple`` configuration: words matched without
case, diacritics kept), ranked by relevance and recency as on the robot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r2d2voice.storage.memory import HALF_LIFE_DAYS, RECENCY_WEIGHT, query_words
from r2d2voice.storage.shipping.rows import FleetFactRow, FleetPassageRow

__all__ = ["FleetMemory"]


def _label(col: str) -> str:
    return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


def _recency(col: str) -> str:
    return (f"(1 + {RECENCY_WEIGHT!r} * power(0.5, GREATEST(0, extract(epoch FROM now() - {col}))"
            f" / 86400 / {HALF_LIFE_DAYS!r}))")


def _devices(col: str, devices: Sequence[str]) -> tuple[str, list[Any]]:
    return (f" AND {col} = ANY(%s)", [list(devices)]) if devices else ("", [])


_TEXT = "to_tsvector('simple', COALESCE({col}, ''))"
_NOT_EXCLUDED = """NOT EXISTS (SELECT 1 FROM recall_exclusions AS e WHERE
    e.device_id = m.device_id AND e.session_id = m.session_id AND e.item_id = m.item_id
    AND e.role = m.role)"""


class FleetMemory:
    """The memory reads of :class:`~r2d2voice.storage.shipping.fleet.FleetStore`."""

    def _query(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def list_facts(self, *, devices: Sequence[str] = ()) -> list[FleetFactRow]:
        """The remembered facts per device, newest first."""
        where, params = _devices("device_id", devices)
        rows = self._query(
            f"SELECT device_id, id, text, {_label('created_at')}, source FROM facts"
            f" WHERE forgotten_at IS NULL{where} ORDER BY device_id, id DESC", params)
        return [FleetFactRow(*r) for r in rows]

    def search_memory(self, query: str, *, devices: Sequence[str] = (), facts: int = 5,
                      passages: int = 5) -> tuple[list[FleetFactRow], list[FleetPassageRow]]:
        """The best remembered facts and the best passages of conversations (not taken out by
        ``forget``) holding any word of ``query``, best first."""
        words = query_words(query)
        if not words:
            return [], []
        tsquery = " || ".join(["plainto_tsquery('simple', %s)"] * len(words))
        text = _TEXT.format(col="f.text")
        where, dev = _devices("f.device_id", devices)
        found = self._query(
            f"SELECT f.device_id, f.id, f.text, {_label('f.created_at')}, f.source"
            f" FROM facts AS f, ({'SELECT ' + tsquery}) AS q(query)"
            f" WHERE f.forgotten_at IS NULL AND {text} @@ q.query{where}"
            f" ORDER BY ts_rank({text}, q.query) * {_recency('f.created_at')} DESC, f.id DESC"
            " LIMIT %s", [*words, *dev, facts])
        text = _TEXT.format(col="m.text")
        where, dev = _devices("m.device_id", devices)
        said = self._query(
            f"SELECT m.device_id, m.session_id, m.role, m.text, {_label('m.created_at')}"
            f" FROM messages AS m, ({'SELECT ' + tsquery}) AS q(query)"
            f" WHERE {text} @@ q.query AND {_NOT_EXCLUDED}{where}"
            f" ORDER BY ts_rank({text}, q.query) * {_recency('m.created_at')} DESC,"
            " m.created_at DESC LIMIT %s", [*words, *dev, passages])
        return [FleetFactRow(*r) for r in found], [FleetPassageRow(*r) for r in said]
