"""The fleet server's schema: versioned, created and migrated forward by r2d2voice.

Every shipped row carries the ``device_id`` of the robot it came from; each table's primary
key is (``device_id``, the row's natural id on the robot), so shipping a row again updates it
in place. Columns (:mod:`~r2d2voice.storage.shipping.tables`) mirror the robot's SQLite schema
(v4: ``tool_executions``, ``text_kept`` false for rows written in privacy mode; v6: the memory's
``facts`` and ``recall_exclusions``); the text time labels become ``timestamptz``. There are
no foreign keys: tables are shipped one by one and a message may arrive before its session.

``fleet`` holds the server's own random id, made with the schema: a robot's watermarks belong
to one server id, so a rebuilt server gets everything again.

``schema_version`` holds one row per applied version. ``MIGRATIONS[n]`` takes a version-n
database to n + 1 (0 = empty); each runs in its own transaction under an advisory lock, so
robots connecting to a fresh server at the same moment apply it once.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from r2d2voice.storage.shipping.errors import FleetSchemaTooNew
from r2d2voice.storage.shipping.tables import TABLES, TableSpec
from r2d2voice.storage.shipping.url import FleetTarget

__all__ = [
    "MIGRATIONS",
    "SERVER_SCHEMA_VERSION",
    "TABLES",
    "TableSpec",
    "fleet_id",
    "migrate",
    "server_version",
]

_V1 = """
CREATE TABLE sessions (
    device_id           text NOT NULL CHECK (device_id <> ''),
    id                  text NOT NULL,
    seq                 bigint NOT NULL,
    started_at          timestamptz NOT NULL,
    ended_at            timestamptz,
    backend             text NOT NULL,
    model               text NOT NULL,
    voice               text,
    service_session_id  text,
    previous_session_id text,
    metadata            jsonb,
    PRIMARY KEY (device_id, id)
);
CREATE INDEX sessions_in_order ON sessions (device_id, seq, id);
CREATE INDEX sessions_by_start ON sessions (started_at);

CREATE TABLE messages (
    device_id   text NOT NULL CHECK (device_id <> ''),
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'assistant')),
    text        text,
    created_at  timestamptz NOT NULL,
    item_id     text NOT NULL,
    response_id text,
    interrupted boolean NOT NULL DEFAULT false,
    played_ms   integer,
    raw_event   text,
    PRIMARY KEY (device_id, session_id, item_id, role)
);
CREATE INDEX messages_in_order ON messages (device_id, session_id, seq);
CREATE INDEX messages_by_time ON messages (created_at);

CREATE TABLE responses (
    device_id           text NOT NULL CHECK (device_id <> ''),
    session_id          text NOT NULL,
    response_id         text NOT NULL,
    status              text NOT NULL,
    status_details      jsonb,
    created_at          timestamptz NOT NULL,
    done_at             timestamptz,
    input_text_tokens   integer,
    input_audio_tokens  integer,
    input_cached_tokens integer,
    output_text_tokens  integer,
    output_audio_tokens integer,
    first_audio_ms      integer,
    first_played_ms     integer,
    PRIMARY KEY (device_id, session_id, response_id)
);
CREATE INDEX responses_by_time ON responses (created_at);

CREATE TABLE errors (
    device_id  text NOT NULL CHECK (device_id <> ''),
    id         bigint NOT NULL,         -- the robot's own row id
    session_id text,
    at         timestamptz NOT NULL,
    source     text NOT NULL CHECK (source IN ('service', 'local')),
    type       text,
    code       text,
    message    text NOT NULL,
    PRIMARY KEY (device_id, id)
);
CREATE INDEX errors_by_time ON errors (at);

CREATE TABLE tool_executions (
    device_id   text NOT NULL CHECK (device_id <> ''),
    session_id  text NOT NULL,
    response_id text,
    item_id     text,
    call_id     text NOT NULL,
    seq         bigint NOT NULL,
    name        text NOT NULL,
    arguments   text,
    output      text,
    status      text NOT NULL,
    exit_code   integer,
    started_at  timestamptz NOT NULL,
    duration_ms integer,
    PRIMARY KEY (device_id, session_id, call_id)
);
CREATE INDEX tool_executions_in_order ON tool_executions (device_id, session_id, seq);
"""

# v2: the server's own id (a robot that finds a different one ships everything again: a new
# or rebuilt server), and the privacy-mode flag of the robot's schema v4.
_V2 = """
CREATE TABLE fleet (
    id         text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO fleet (id) VALUES (md5(random()::text || clock_timestamp()::text));
ALTER TABLE messages ADD COLUMN text_kept boolean NOT NULL DEFAULT true;
ALTER TABLE tool_executions ADD COLUMN text_kept boolean NOT NULL DEFAULT true;
"""

# v3: the robots' memory (their schema v6): remembered facts (``forgotten_at`` set when
# forgotten), the passages ``forget`` took out of recall (by the message's natural key), and a
# full-text index over the messages for ``r2d2voice memory search --db postgresql://…``.
_V3 = """
CREATE TABLE facts (
    device_id    text NOT NULL CHECK (device_id <> ''),
    id           bigint NOT NULL,        -- the robot's own row id
    text         text NOT NULL,
    created_at   timestamptz NOT NULL,
    source       text NOT NULL,
    forgotten_at timestamptz,
    PRIMARY KEY (device_id, id)
);
CREATE TABLE recall_exclusions (
    device_id    text NOT NULL CHECK (device_id <> ''),
    session_id   text NOT NULL,
    item_id      text NOT NULL,
    role         text NOT NULL,
    forgotten_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, session_id, item_id, role)
);
CREATE INDEX messages_text_search ON messages
    USING gin (to_tsvector('simple', COALESCE(text, '')));
"""

#: ``MIGRATIONS[n]``: the SQL taking a version-n server schema to n + 1 (0 = empty database).
MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3}
#: The server schema version this code writes and reads.
SERVER_SCHEMA_VERSION = max(MIGRATIONS) + 1

_LOCK_KEY = 0x72326432  # pg_advisory_xact_lock key: ASCII "r2d2"
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def server_version(conn: psycopg.Connection) -> int:
    """The schema version recorded on the server (0: none yet)."""
    row = conn.execute(
        "SELECT to_regclass('schema_version') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT COALESCE(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def fleet_id(conn: psycopg.Connection) -> str:
    """The server's own id (schema v2 on)."""
    row = conn.execute("SELECT id FROM fleet").fetchone()
    return str(row[0]) if row else ""


def _too_new(target: FleetTarget, version: int, known: int) -> FleetSchemaTooNew:
    return FleetSchemaTooNew(
        f"fleet server {target} has schema version {version}, newer than this r2d2voice "
        f"understands ({known}); upgrade r2d2voice"
    )


def migrate(
    conn: psycopg.Connection,
    target: FleetTarget,
    *,
    migrations: dict[int, str] | None = None,
) -> int:
    """Bring the server schema to the newest version in ``migrations`` (default
    :data:`MIGRATIONS`), one transaction per step; returns that version.

    Raises :class:`FleetSchemaTooNew` when the server is already past it; psycopg errors
    propagate (the caller maps them), leaving the last fully applied version in place.
    """
    steps = MIGRATIONS if migrations is None else migrations
    newest = max(steps) + 1
    version = server_version(conn)
    while version != newest:
        if version > newest:
            raise _too_new(target, version, newest)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(_VERSION_TABLE)
            version = server_version(conn)  # another robot may have moved it meanwhile
            if version < newest:
                for stmt in _statements(steps[version]):
                    conn.execute(stmt)  # type: ignore[arg-type]
                version += 1
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return version


def _statements(script: str) -> Sequence[str]:
    """Statements of a schema script (no ';' inside literals), comments stripped."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
