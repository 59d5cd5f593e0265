"""Logging: journal-style priorities under systemd, readable lines otherwise, key scrubbed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from r2d2voice.system.logs import setup_logging
setup_logging("DEBUG", secrets=["sk-live-0123456789"])
log = logging.getLogger("r2d2voice.test")
log.debug("debug line")
log.info("info with key %s", "sk-live-0123456789")
log.warning("warning line")
log.error("error line")
try:
    raise ValueError("boom sk-live-0123456789")
except ValueError:
    log.exception("failed")
"""


def run(journal: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_journal_lines_carry_syslog_priorities_and_no_timestamps() -> None:
    lines = run(journal=True).splitlines()
    assert lines[0] == "<7>r2d2voice.test: debug line"
    assert lines[1] == "<6>r2d2voice.test: info with key ***"
    assert "<4>r2d2voice.test: warning line" in lines
    assert "<3>r2d2voice.test: error line" in lines
    # every line of a traceback is prefixed, so the journal keeps them together as errors
    assert all(line.startswith("<") for line in lines)


@pytest.mark.parametrize("journal", [True, False])
def test_the_api_key_never_reaches_the_log(journal: bool) -> None:
    out = run(journal)
    assert "sk-live-0123456789" not in out
    assert "info with key ***" in out and "boom ***" in out


def test_terminal_lines_have_time_and_level() -> None:
    line = run(journal=False).splitlines()[0]
    stamp, level = line.split()[:2]
    assert level == "DEBUG" and stamp.count(":") == 2
