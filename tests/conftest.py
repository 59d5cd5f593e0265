"""Shared fixtures: one PulseAudio rig and one PostgreSQL cluster per test session, a mosquitto
broker per test, the local backend, scrubbed settings."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing
from broker import Broker, find_mosquitto
from broker import skip_or_fail as skip_or_fail_broker
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


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A mosquitto broker of this test's own on a free loopback port (user ``r2d2``); with
    ``@pytest.mark.parametrize("broker", ["tls"], indirect=True)`` a TLS listener too."""
    binary = find_mosquitto()
    if binary is None:
        skip_or_fail_broker("mosquitto not found (apt install mosquitto)")
    # its own directory: pytest's are 0700, and as root mosquitto reads as user mosquitto
    root = Path(tempfile.mkdtemp(prefix="r2d2voice-broker-"))
    server = Broker(binary, root, tls=getattr(request, "param", None) == "tls")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db(pg_server: PgServer) -> Iterator[str]:
    """A fresh PostgreSQL database of this test's own on ``pg_server`` (its name); dropped after.
    Test modules about SQLite files define their own ``db``."""
    name = pg_server.create_database()
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def url(pg_server: PgServer, db: str) -> str:
    """The ``postgresql://`` URL of :func:`db`."""
    return pg_server.url(db)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own R2D2_*/OPENAI*/REALTIME* settings, systemd sockets or
    libpq's PGHOST/PGPASSWORD/PGSERVICE..."""
    for key in list(os.environ):
        if key.startswith((*SCRUBBED_PREFIXES, "PG")):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _private_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's runs keep their sockets (control, events) in a runtime directory of the
    test's own, never the developer's (a short path: a Unix socket's is at most 107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="r2rt-"))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """systemd's side of ``$NOTIFY_SOCKET``: an abstract AF_UNIX datagram socket, non-blocking;
    yields (the ``@name`` address for ``$NOTIFY_SOCKET``, the socket)."""
    name = f"r2d2voice-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    yield "@" + name, sock
    sock.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (two workers on a two-core machine), every test of the PulseAudio rig
    runs on one worker and every PostgreSQL test on one worker, so each server is started once."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "pulse_rig" in names or item.get_closest_marker("pulse"):
            item.add_marker(pytest.mark.xdist_group("pulse"))
        elif "pg_server" in names:
            item.add_marker(pytest.mark.xdist_group("postgresql"))


@pytest.fixture
def thread_clock() -> trio.testing.MockClock:
    """A MockClock for code that works in threads (the shipper): time jumps only after 100 ms of
    real idleness, so a worker thread that is still busy is not skipped past, as it can be with
    ``autojump_clock`` (threshold 0) on a loaded machine."""
    return trio.testing.MockClock(autojump_threshold=0.1)
