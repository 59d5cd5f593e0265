"""Shared fixtures: one PulseAudio rig per test session, the local backend, scrubbed settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pulse import PulseRig, open_pulse_rig
from support import SCRUBBED_PREFIXES


@pytest.fixture(scope="session")
def pulse_rig() -> Iterator[PulseRig]:
    """The one private PulseAudio server (null sinks ``mic`` and ``speaker``) of this run."""
    with open_pulse_rig() as rig:
        yield rig


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own R2D2_*/OPENAI*/REALTIME* settings or systemd sockets."""
    for key in list(os.environ):
        if key.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(key)
