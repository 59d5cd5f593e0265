"""The click layer: every command listed, ``--help`` cheap, failures mapped to one line and an
exit code, ``serve-local`` serving until SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from support import clean_env, run_cli

from r2d2voice.cli.main import exit_for

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup
from r2d2voice.errors import ConfigError, UsageError

COMMANDS = ("run", "replay", "export", "sessions", "usage", "stats", "devices", "serve-local")


def test_help_lists_every_command_without_loading_trio_numpy_or_portaudio() -> None:
    code = ("import sys, r2d2voice.cli.main as c\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(c.main, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"for cmd in {COMMANDS!r}:\n"
            "    assert cmd in r.output, cmd\n"
            "bad = [m for m in ('sounddevice', 'trio', 'numpy', 'soxr') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_python_m_and_the_version(tmp_path: Path) -> None:
    r = run_cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("r2d2voice, version ")


def test_a_bad_invocation_is_exit_2(tmp_path: Path) -> None:
    r = run_cli("replay", cwd=tmp_path)
    assert r.returncode == 2 and "Missing argument 'FILE'" in r.stderr


def _exit(exc: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        exit_for(exc)
    return done.value.code, capsys.readouterr().err


def test_errors_from_nurseries_become_one_line_and_their_exit_code(capsys) -> None:
    nested = BaseExceptionGroup("run", [OSError("lost"),
                                        ExceptionGroup("link", [ConfigError("bad key")])])
    assert _exit(nested, capsys) == (3, "r2d2voice: error: bad key\n")
    assert _exit(UsageError("no such file"), capsys) == (2, "r2d2voice: error: no such file\n")
    assert _exit(KeyboardInterrupt(), capsys) == (130, "r2d2voice: error: interrupted\n")
    code, err = _exit(ExceptionGroup("x", [ValueError("boom")]), capsys)
    assert (code, err) == (1, "r2d2voice: error: unexpected ValueError: boom\n")


async def test_serve_local_serves_until_sigterm(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "r2d2voice", "serve-local", "--port", "0"]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(lambda task_status: trio.run_process(
            argv, cwd=tmp_path, env=clean_env(HOME=str(tmp_path)), stdout=subprocess.PIPE,
            check=False, task_status=task_status))
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        text = line.decode().strip()
        assert text.startswith("local Realtime backend on ws://127.0.0.1:"), text
        port = int(text.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)  # it listens
        await stream.aclose()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    assert proc.returncode == 0


def test_serve_local_on_a_busy_port_is_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve-local", "--port", str(port), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"r2d2voice: error: cannot listen on 127.0.0.1:{port}: ")
