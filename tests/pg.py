"""A throw-away PostgreSQL cluster for the tests: ``initdb`` in a temp dir, ``pg_ctl`` on a free
loopback port.

One cluster per test session (``tests/conftest.py``: the fixture ``pg_server``); each test makes
its own database with :meth:`PgServer.create_database`. The cluster lives in ``/dev/shm`` when it
can (else the temp dir), listens on 127.0.0.1 only (its Unix socket sits in its own dir), asks
for a password (scram-sha-256, superuser ``r2d2``), and trades durability for speed (``fsync``,
``synchronous_commit`` and ``full_page_writes`` off).

PostgreSQL refuses to run as root: when the tests run as root the server runs as ``postgres``
(the user Debian's package creates), or ``nobody`` failing that, through ``runuser``. The
binaries are looked for on PATH and in ``/usr/lib/postgresql/<version>/bin`` (Debian keeps
``initdb`` and ``pg_ctl`` there, off PATH). Without them the fixture skips with the reason;
under ``CI=true`` it fails instead (``.ci/install`` installs the ``postgresql`` package).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "r2d2"
PASSWORD = "Fl33t-s3cret:pw"  # distinctive, so a test can tell it never leaks
TOOLS = ("initdb", "pg_ctl", "postgres")
_names = itertools.count(1)


def skip_or_fail(reason: str) -> None:
    """Skip, except under ``CI=true`` where a missing server is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL must run in CI)", pytrace=False)
    pytest.skip(reason)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bin_dir() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: PATH first, then Debian's newest
    ``/usr/lib/postgresql/<version>/bin``."""
    candidates: list[str] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all(os.access(os.path.join(directory, t), os.X_OK) for t in TOOLS):
            return Path(directory)
    return None


def _server_user() -> str | None:
    """The unprivileged account to run the server as when we are root (None: run as us)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def _runuser() -> str | None:
    """util-linux ``runuser`` (in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    if find_bin_dir() is None:
        return "PostgreSQL server binaries not found (apt install postgresql)"
    if os.geteuid() == 0 and (_runuser() is None or _server_user() is None):
        return "running as root without runuser or an unprivileged user for PostgreSQL"
    return None


def _scratch_dir() -> str | None:
    """Where the cluster lives: ``/dev/shm`` when usable (memory: CREATE DATABASE there takes
    ~0.03 s against ~0.3 s on the development machine's disk), else the temp dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A running throw-away cluster."""

    host = "127.0.0.1"
    user = SUPERUSER
    password = PASSWORD

    def __init__(self, bin_dir: Path, root: Path, run_as: str | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.run_as = run_as
        self.port = 0

    # -- processes --------------------------------------------------------------------

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        if self.run_as is not None:
            cmd = [_runuser() or "runuser", "-u", self.run_as, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}"
                               f"\n{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "server log:\n" + "\n".join(self.log.read_text().splitlines()[-15:])
        return ""

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# tests: loopback only, socket in the temp dir, speed over durability\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 40\nshared_buffers = 32MB\nwal_init_zero = off\n"
            )

    def start(self) -> None:
        """Start (or restart after :meth:`stop`) on the same port; a first start picks one."""
        for _attempt in range(3):
            if not self.port:
                self.port = _free_port()
                with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                    conf.write(f"port = {self.port}\n")
            proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                             "-t", "60", "start", check=False)
            if proc.returncode == 0:
                return
            if "could not bind" not in self._log_tail():
                break
            self.port = 0  # someone took the port meanwhile: pick another
        raise RuntimeError(f"pg_ctl start failed: {proc.stderr.strip()}\n{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, clean shutdown)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    # -- clients ----------------------------------------------------------------------

    def url(self, dbname: str = "postgres", *, password: str | None = PASSWORD) -> str:
        """``postgresql://r2d2:PASSWORD@127.0.0.1:PORT/DBNAME`` (``password=None``: none)."""
        auth = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> Any:
        """An autocommit psycopg connection as the superuser."""
        import psycopg

        return psycopg.connect(self.url(dbname), autocommit=True)

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"t{os.getpid()}_{next(_names)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def open_pg_server() -> Iterator[PgServer]:
    """A started cluster, stopped and deleted on exit (skips/fails when impossible)."""
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    root = Path(tempfile.mkdtemp(prefix="r2d2-pg-", dir=_scratch_dir()))
    server = PgServer(bin_dir, root, _server_user())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
