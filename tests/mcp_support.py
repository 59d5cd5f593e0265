"""Real MCP servers for the tests: ``tests/mcp_server.py`` (written with the SDK) as a stdio
process, or on streamable HTTP on a loopback port, and tools files that name them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SERVER = Path(__file__).with_name("mcp_server.py")


def calls(log: Path) -> list[dict[str, Any]]:
    """What reached the server: one dict per call (``tool`` and its arguments)."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def stdio_entry(log: Path, name: str = "home", extra: str = "") -> str:
    """A ``[[mcp]]`` table running the test server over stdio, logging to ``log``."""
    return f"""
[[mcp]]
name = "{name}"
command = ["{sys.executable}", "{SERVER}"]
{extra}
[mcp.env]
MCP_TEST_LOG = "{log}"
"""


@contextmanager
def http_server(tmp_path: Path, token: str = "s3cret-token") -> Iterator[str]:
    """The test server on streamable HTTP on 127.0.0.1 (every request needs ``Bearer token``);
    yields its URL; stopped (and waited for) on the way out."""
    port_file = tmp_path / "port"
    log = tmp_path / "http-calls.log"
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port_file),
                             "--token", token], env={**os.environ, "MCP_TEST_LOG": str(log)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the HTTP MCP test server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}/mcp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def processes_with_env(entry: str) -> list[int]:
    """Pids of live processes whose environment holds ``entry`` (``NAME=value``)."""
    found = []
    for pid in (e for e in os.listdir("/proc") if e.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if entry.encode() in environ and state[state.rfind(b")") + 2:][:1] != b"Z":
            found.append(int(pid))
    return found
