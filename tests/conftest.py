"""Shared fixtures: one PulseAudio rig and one PostgreSQL cluster per test session, the local
backend, scrubbed settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pg import PgServer, open_pg_server
from pulse import PulseRig, open_pulse_rig
from support import SCRUBBED_PREFIXES


@pytest.fixture(scope="session")
def pulse_rig() -> Iterator[PulseRig]:
    """The one private PulseAudio server (null sinks ``mic`` and ``speaker``) of this run."""
    with open_pulse_rig() as rig:
        yield rig


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The one throw-away PostgreSQL cluster of this run (each test makes its own database)."""
    with open_pg_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own R2D2_*/OPENAI*/REALTIME* settings or systemd sockets."""
    for key in list(os.environ):
        if key.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(key)
