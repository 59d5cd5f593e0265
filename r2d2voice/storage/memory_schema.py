"""The memory's tables (schema v6): remembered facts, passages excluded from recall, and the
full-text index over both, kept in sync by triggers.

* ``facts``: what a person asked the robot to keep (``remember``) or its owner added
  (``r2d2voice memory add``). Forgetting sets ``forgotten_at`` (the row stays, so the fleet
  server learns of it); only remembered facts are indexed.
* ``recall_exclusions``: messages ``forget`` took out of ``recall``, by the message's natural key
  (session, item, role), so the fleet server can apply them too. The message itself stays: it is
  the record (deleting is retention's job, and a deleted message takes its exclusion along).
* ``messages_fts`` / ``facts_fts``: FTS5 (``unicode61 remove_diacritics 2``) with *external
  content*: the index holds tokens only, the words are read from the views ``memory_passages``
  (messages with text that are not excluded: privacy-mode rows have none) and ``memory_facts``
  (facts not forgotten). The triggers below keep each index equal to its view, so FTS5's own
  ``rebuild`` and ``integrity-check`` work on them.
"""

from __future__ import annotations

import sqlite3

from r2d2voice.errors import ConfigError

__all__ = ["FACT_SOURCES", "MAX_FACT_CHARS", "MEMORY_SCHEMA", "MEMORY_TABLES", "migrate_memory",
           "statements"]

#: the longest fact kept (characters)
MAX_FACT_CHARS = 500
#: ``facts.source``: kept by the robot in a conversation, or added by its owner
FACT_SOURCES = ("conversation", "owner")
#: the memory tables that ship to the fleet server
MEMORY_TABLES = ("facts", "recall_exclusions")

_TOKENIZE = "tokenize = 'unicode61 remove_diacritics 2'"
# The exclusion of message X (``OLD`` or ``NEW``), as a condition.
_EXCLUDED = ("EXISTS (SELECT 1 FROM recall_exclusions AS e WHERE e.session_id = {m}.session_id"
             " AND e.item_id = {m}.item_id AND e.role = {m}.role)")


def _excluded(m: str) -> str:
    return _EXCLUDED.format(m=m)


MEMORY_SCHEMA = f"""
CREATE TABLE facts (
    id           INTEGER PRIMARY KEY,    -- order: the newest fact has the highest id
    text         TEXT NOT NULL CHECK (length(text) BETWEEN 1 AND {MAX_FACT_CHARS}),
    created_at   TEXT NOT NULL,          -- wall-clock label
    source       TEXT NOT NULL CHECK (source IN ('conversation', 'owner')),
    forgotten_at TEXT                    -- NULL: remembered
);
CREATE TABLE recall_exclusions (
    session_id   TEXT NOT NULL,          -- the message's natural key
    item_id      TEXT NOT NULL,
    role         TEXT NOT NULL,
    forgotten_at TEXT NOT NULL,          -- wall-clock label
    PRIMARY KEY (session_id, item_id, role)
);

CREATE VIEW memory_passages AS
    SELECT id, text FROM messages WHERE text != '' AND NOT {_excluded("messages")};
CREATE VIEW memory_facts AS SELECT id, text FROM facts WHERE forgotten_at IS NULL;
CREATE VIRTUAL TABLE messages_fts USING fts5(
    text, content = 'memory_passages', content_rowid = 'id', {_TOKENIZE});
CREATE VIRTUAL TABLE facts_fts USING fts5(
    text, content = 'memory_facts', content_rowid = 'id', {_TOKENIZE});

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
WHEN NEW.text != '' AND NOT {_excluded("NEW")}
BEGIN
    INSERT INTO messages_fts (rowid, text) VALUES (NEW.id, NEW.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages
WHEN OLD.text IS NOT NEW.text AND NOT {_excluded("NEW")}
BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text)
        SELECT 'delete', OLD.id, OLD.text WHERE OLD.text != '';
    INSERT INTO messages_fts (rowid, text) SELECT NEW.id, NEW.text WHERE NEW.text != '';
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text)
        SELECT 'delete', OLD.id, OLD.text WHERE OLD.text != '' AND NOT {_excluded("OLD")};
    DELETE FROM recall_exclusions
        WHERE session_id = OLD.session_id AND item_id = OLD.item_id AND role = OLD.role;
END;
CREATE TRIGGER recall_exclusions_insert AFTER INSERT ON recall_exclusions
BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text)
        SELECT 'delete', m.id, m.text FROM messages AS m
        WHERE m.session_id = NEW.session_id AND m.item_id = NEW.item_id AND m.role = NEW.role
          AND m.text != '';
END;
CREATE TRIGGER recall_exclusions_delete AFTER DELETE ON recall_exclusions
BEGIN
    INSERT INTO messages_fts (rowid, text)
        SELECT m.id, m.text FROM messages AS m
        WHERE m.session_id = OLD.session_id AND m.item_id = OLD.item_id AND m.role = OLD.role
          AND m.text != '';
END;

CREATE TRIGGER facts_fts_insert AFTER INSERT ON facts WHEN NEW.forgotten_at IS NULL
BEGIN
    INSERT INTO facts_fts (rowid, text) VALUES (NEW.id, NEW.text);
END;
CREATE TRIGGER facts_fts_update AFTER UPDATE OF text, forgotten_at ON facts
BEGIN
    INSERT INTO facts_fts (facts_fts, rowid, text)
        SELECT 'delete', OLD.id, OLD.text WHERE OLD.forgotten_at IS NULL;
    INSERT INTO facts_fts (rowid, text) SELECT NEW.id, NEW.text WHERE NEW.forgotten_at IS NULL;
END;
CREATE TRIGGER facts_fts_delete AFTER DELETE ON facts WHEN OLD.forgotten_at IS NULL
BEGIN
    INSERT INTO facts_fts (facts_fts, rowid, text) VALUES ('delete', OLD.id, OLD.text);
END;
"""


def statements(script: str) -> list[str]:
    """The statements of ``script``, trigger bodies whole (SQLite says where each ends)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete statement: {pending.strip()[:60]}")
    return out


def migrate_memory(conn: sqlite3.Connection) -> None:
    """Create the memory's tables, views, indexes and triggers, and index every message kept
    so far (a schema migration step: runs inside the caller's transaction)."""
    try:
        for stmt in statements(MEMORY_SCHEMA):
            conn.execute(stmt)
    except sqlite3.OperationalError as exc:
        if "fts5" not in str(exc):
            raise
        raise ConfigError(
            f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5, which the memory's "
            "full-text index needs: use a Python whose sqlite3 has it (Debian's and Raspberry "
            "Pi OS's do)") from None
    # every message with text, in one pass (the views say which)
    conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
