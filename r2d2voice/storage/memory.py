"""The robot's memory, in its SQLite database: remember a fact, recall facts and past
conversations, forget (the tables and triggers: :mod:`r2d2voice.storage.memory_schema`).

**Queries.** A query's words (``\\w+``, at most :data:`MAX_TERMS`) are matched as FTS5 terms,
so case and diacritics don't matter (``unicode61 remove_diacritics 2``). ``recall`` wants any
of them (the more a passage has, and the rarer they are, the better it ranks); ``forget`` wants
all of them, so it takes out only what was named.

**Ranking.** Relevance is FTS5's bm25, scaled so the best candidate of its kind is 1, times a
recency factor ``1 + RECENCY_WEIGHT * 0.5 ** (age_days / HALF_LIFE_DAYS)``: a match from today
counts up to twice one from long ago, so recency decides between equally good matches and a
clearly better old one still wins. Facts and passages are ranked apart and returned apart.

**Bounded work.** bm25 costs a visit to every matching message, so a recall over a million
messages ranks at most :data:`RANKED_DOCS` of them: each word's matches are counted up to that
bound first and the rarest words are kept while their matches fit (a word said in most
conversations — "the", "what" — tells nothing anyway). The candidates are then the
:data:`CANDIDATES` best by bm25 and the :data:`CANDIDATES` newest. When every word is that
common, they are the :data:`COMMON_CANDIDATES` newest messages holding any of them, each as
relevant as the share of the words it holds (an intersection of common words can cost a scan of
the whole index: not done). Results are bounded in count and length (long messages come as a
snippet around the match).

Order comes from row ids (insertion order), never from the wall clock; wall-clock labels only
give a match its day and its age.
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from r2d2voice.storage.memory_schema import FACT_SOURCES, MAX_FACT_CHARS
from r2d2voice.storage.timestamps import format_ts, local_date, parse_ts

__all__ = [
    "CANDIDATES",
    "HALF_LIFE_DAYS",
    "MAX_TERMS",
    "RANKED_DOCS",
    "RECENCY_WEIGHT",
    "Fact",
    "Forgotten",
    "Passage",
    "Recollection",
    "TooBroad",
    "facts_json",
    "forget",
    "iter_facts",
    "last_talked",
    "passages_json",
    "query_terms",
    "query_words",
    "recall",
    "recency",
    "remember",
]

#: words of a query used, at most
MAX_TERMS = 8
#: messages ranked by bm25 in one recall, at most
RANKED_DOCS = 8000
#: candidates of each kind: this many best by bm25, and this many newest
CANDIDATES = 32
#: candidates when every word is too common to rank: the newest holding any of them
COMMON_CANDIDATES = 128
#: days after which a match's recency bonus has halved
HALF_LIFE_DAYS = 30.0
#: a match from now counts (1 + this) times one from long ago
RECENCY_WEIGHT = 1.0
#: a passage longer than this comes as a snippet around the match
PASSAGE_CHARS = 400
_SNIPPET_TOKENS = 40
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Fact:
    """A remembered fact (``source``: "conversation" or "owner")."""

    id: int
    text: str
    created_at: str
    source: str


@dataclass(frozen=True)
class Passage:
    """A message of a past conversation, as stored (``words``: its text, or a snippet of it)."""

    session_id: str
    role: str
    words: str
    created_at: str


@dataclass(frozen=True)
class Recollection:
    """What ``recall`` found: the best facts and the best passages, each best first."""

    facts: list[Fact]
    passages: list[Passage]


@dataclass(frozen=True)
class Forgotten:
    """What ``forget`` did: the facts it forgot, how many passages it took out of recall, and
    the newest few of those."""

    facts: list[Fact]
    passages: int
    examples: list[Passage]

    @property
    def nothing(self) -> bool:
        return not self.facts and not self.passages


class TooBroad(ValueError):
    """A ``forget`` that would take out more than it may; nothing was forgotten."""


def query_words(query: str) -> list[str]:
    """The words of ``query`` (``\\w+``, the first :data:`MAX_TERMS` distinct ones)."""
    seen: dict[str, str] = {}
    for word in _WORD.findall(unicodedata.normalize("NFC", query)):
        seen.setdefault(word.casefold(), word)
    return list(seen.values())[:MAX_TERMS]


def query_terms(query: str) -> list[str]:
    """:func:`query_words`, each quoted as an FTS5 string (``\\w+`` holds no quote)."""
    return [f'"{word}"' for word in query_words(query)]


def _any_of(terms: Sequence[str]) -> str:
    return " OR ".join(terms)


def _all_of(terms: Sequence[str]) -> str:
    return " AND ".join(terms)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:  # roll back and re-raise, whatever it is
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def facts_json(facts: list[Fact], tz: tzinfo | None) -> list[dict[str, Any]]:
    """Facts as the memory tools and ``memory search --format json`` show them (``tz``: the
    zone of their days; None: the local one)."""
    return [{"id": f.id, "day": local_date(f.created_at, tz).isoformat(), "fact": f.text}
            for f in facts]


def passages_json(passages: list[Passage], tz: tzinfo | None) -> list[dict[str, Any]]:
    """Passages of past conversations as the tools show them."""
    return [{"day": local_date(p.created_at, tz).isoformat(), "who": p.role, "words": p.words}
            for p in passages]


# -- remember ---------------------------------------------------------------------------------


def remember(conn: sqlite3.Connection, text: str, *, source: str,
             now: datetime) -> tuple[Fact, bool]:
    """Keep ``text`` (1 to 500 characters once stripped) as a fact; returns it and whether it is
    new (the same words already remembered are not kept twice). ValueError for bad text."""
    text = text.strip()
    if not text:
        raise ValueError("the fact is empty")
    if len(text) > MAX_FACT_CHARS:
        raise ValueError(f"a fact is at most {MAX_FACT_CHARS} characters, this one {len(text)}")
    if source not in FACT_SOURCES:
        raise ValueError(f"source must be one of {FACT_SOURCES}, not {source!r}")
    with _immediate(conn):
        terms = query_terms(text)
        if terms:  # same words, same order: the fact is known (the index finds it fast)
            for row in conn.execute(
                    "SELECT f.id, f.text, f.created_at, f.source FROM facts_fts"
                    " JOIN facts AS f ON f.id = facts_fts.rowid WHERE facts_fts MATCH ?",
                    (_all_of(terms),)):
                if _words(row[1]) == _words(text):
                    return Fact(*row), False
        label = format_ts(now)
        cur = conn.execute("INSERT INTO facts (text, created_at, source) VALUES (?, ?, ?)",
                           (text, label, source))
        assert cur.lastrowid is not None
        return Fact(cur.lastrowid, text, label, source), True


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(unicodedata.normalize("NFC", text))]


def iter_facts(conn: sqlite3.Connection) -> Iterator[Fact]:
    """The remembered facts, newest first (a cursor: stop when you have enough)."""
    cur = conn.execute("SELECT id, text, created_at, source FROM facts"
                       " WHERE forgotten_at IS NULL ORDER BY id DESC")
    try:
        for row in cur:
            yield Fact(*row)
    finally:
        cur.close()


def last_talked(conn: sqlite3.Connection) -> str | None:
    """The label of the last message of the latest session that has one (None: no
    conversation yet)."""
    row = conn.execute(
        "SELECT (SELECT m.created_at FROM messages AS m INDEXED BY messages_by_seq"
        "        WHERE m.session_id = s.id ORDER BY m.seq DESC, m.id DESC LIMIT 1) AS last"
        " FROM sessions AS s INDEXED BY sessions_by_seq"
        " WHERE EXISTS (SELECT 1 FROM messages AS m WHERE m.session_id = s.id)"
        " ORDER BY s.seq DESC LIMIT 1").fetchone()
    return row[0] if row else None


# -- recall -----------------------------------------------------------------------------------


def recall(conn: sqlite3.Connection, query: str, *, now: datetime, facts: int = 5,
           passages: int = 5) -> Recollection:
    """The ``facts`` best remembered facts and the ``passages`` best passages of past
    conversations for ``query``, each best first (see the module docstring)."""
    terms = query_terms(query)
    if not terms:
        return Recollection([], [])
    return Recollection(_ranked(_fact_candidates(conn, terms), now, facts),
                        _ranked(_passage_candidates(conn, terms), now, passages))


# A candidate: (row id, relevance, created_at label, the row).
_Candidate = tuple[int, float, str, Any]


def _ranked(candidates: list[_Candidate], now: datetime, limit: int) -> list[Any]:
    if not candidates:
        return []
    best = max(rel for _, rel, _, _ in candidates) or 1.0

    def score(c: _Candidate) -> tuple[float, int]:
        return (c[1] / best) * recency(c[2], now), c[0]

    return [c[3] for c in sorted(candidates, key=score, reverse=True)[:limit]]


def recency(label: str, now: datetime) -> float:
    """The recency factor of a match labelled ``label`` (see the module docstring)."""
    try:
        age = max(0.0, (now - parse_ts(label)).total_seconds() / 86400)
    except ValueError:
        return 1.0
    return 1.0 + RECENCY_WEIGHT * 0.5 ** (age / HALF_LIFE_DAYS)


def _fact_candidates(conn: sqlite3.Connection, terms: Sequence[str]) -> list[_Candidate]:
    rows = conn.execute(
        "SELECT f.id, -bm25(facts_fts), f.created_at, f.text, f.source FROM facts_fts"
        " JOIN facts AS f ON f.id = facts_fts.rowid WHERE facts_fts MATCH ?"
        " ORDER BY rank LIMIT ?", (_any_of(terms), 2 * CANDIDATES)).fetchall()
    return [(i, rel, at, Fact(i, text, at, source)) for i, rel, at, text, source in rows]


_BEST = ("SELECT rowid, -bm25(messages_fts), snippet(messages_fts, 0, '', '', '…', ?)"
         " FROM messages_fts WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?")
_NEWEST = ("SELECT rowid, {relevance}, snippet(messages_fts, 0, '', '', '…', ?)"
           " FROM messages_fts WHERE messages_fts MATCH ? ORDER BY rowid DESC LIMIT ?")


def _passage_candidates(conn: sqlite3.Connection, terms: Sequence[str]) -> list[_Candidate]:
    counts = {t: _matches(conn, t, RANKED_DOCS + 1) for t in terms}
    kept: list[str] = []
    total = 0
    for term in sorted((t for t in terms if counts[t]), key=counts.__getitem__):
        if total + counts[term] > RANKED_DOCS:
            break
        kept.append(term)
        total += counts[term]
    found: dict[int, tuple[float, str]] = {}
    if kept:
        match = _any_of(kept)
        for sql in (_BEST, _NEWEST.format(relevance="-bm25(messages_fts)")):
            for rowid, rel, snippet in conn.execute(sql, (_SNIPPET_TOKENS, match, CANDIDATES)):
                found[rowid] = (rel, snippet)
    elif any(counts.values()):  # every word is common: the newest messages with any of them
        present = [t for t in terms if counts[t]]
        wanted = {w for t in present for w in _folded(t)}
        for rowid, _, snippet in conn.execute(_NEWEST.format(relevance="0"), (
                _SNIPPET_TOKENS, _any_of(present), COMMON_CANDIDATES)):
            found[rowid] = (0.0, snippet)
        # relevance: the share of the words each holds (as the index folds them)
        return [(i, len(wanted & _folded(p.words)) / len(wanted), at, p)
                for i, _, at, p in _passages(conn, found)]
    return _passages(conn, found)


def _folded(text: str) -> set[str]:
    """The words of ``text`` as the index sees them: case and diacritics removed."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text)
                    if not unicodedata.combining(c))
    return {w.casefold() for w in _WORD.findall(plain)}


def _matches(conn: sqlite3.Connection, term: str, bound: int) -> int:
    """How many messages hold ``term``, counted up to ``bound``."""
    return conn.execute("SELECT count(*) FROM (SELECT 1 FROM messages_fts"
                        " WHERE messages_fts MATCH ? LIMIT ?)", (term, bound)).fetchone()[0]


def _passages(conn: sqlite3.Connection,
              found: dict[int, tuple[float, str]]) -> list[_Candidate]:
    if not found:
        return []
    ids = list(found)
    rows = conn.execute(
        "SELECT id, session_id, role, text, created_at FROM messages"
        f" WHERE id IN ({', '.join('?' * len(ids))})", ids).fetchall()
    out: list[_Candidate] = []
    for rowid, session_id, role, text, at in rows:
        rel, snippet = found[rowid]
        words = text if len(text) <= PASSAGE_CHARS else snippet
        out.append((rowid, rel, at, Passage(session_id, role, words, at)))
    return out


# -- forget -----------------------------------------------------------------------------------


def forget(conn: sqlite3.Connection, query: str, *, now: datetime, limit: int | None = None,
           examples: int = 3) -> Forgotten:
    """Forget the facts holding every word of ``query`` and take the passages holding every
    word out of recall (the messages stay), in one transaction. With ``limit``, more matches
    than that forget nothing and raise :class:`TooBroad`. ValueError for a query without
    words."""
    terms = query_terms(query)
    if not terms:
        raise ValueError("the query has no words")
    match = _all_of(terms)
    label = format_ts(now)
    too_broad = TooBroad(f"{query.strip()!r} matches more than {limit} facts and passages")
    with _immediate(conn):
        facts = [Fact(*row) for row in conn.execute(
            "SELECT f.id, f.text, f.created_at, f.source FROM facts_fts"
            " JOIN facts AS f ON f.id = facts_fts.rowid WHERE facts_fts MATCH ?"
            " ORDER BY f.id DESC", (match,))]
        if limit is not None and len(facts) > limit:
            raise too_broad
        found = conn.execute(
            "SELECT m.session_id, m.item_id, m.role, m.text, m.created_at FROM messages_fts"
            " JOIN messages AS m ON m.id = messages_fts.rowid WHERE messages_fts MATCH ?"
            " ORDER BY messages_fts.rowid DESC LIMIT ?",
            (match, -1 if limit is None else limit + 1 - len(facts))).fetchall()
        if limit is not None and len(facts) + len(found) > limit:
            raise too_broad
        conn.executemany("UPDATE facts SET forgotten_at = ? WHERE id = ?",
                         [(label, f.id) for f in facts])
        conn.executemany("INSERT OR IGNORE INTO recall_exclusions (session_id, item_id, role,"
                         " forgotten_at) VALUES (?, ?, ?, ?)",
                         [(sid, item, role, label) for sid, item, role, _, _ in found])
    shown = [Passage(sid, role, _cut(text), at) for sid, _, role, text, at in found[:examples]]
    return Forgotten(facts, len(found), shown)


def _cut(text: str) -> str:
    return text if len(text) <= PASSAGE_CHARS else text[:PASSAGE_CHARS - 1] + "…"
