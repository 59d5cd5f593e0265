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

COMMANDS = ("run", "replay", "export", "sessions", "usage", "stats", "devices", "serve-local",
            "wake", "tools", "prune", "ship")


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


def test_tools_command_reads_the_flag_or_the_setting(tmp_path: Path) -> None:
    (tmp_path / "tools.toml").write_text('builtins = ["get_time", "set_volume"]\n')
    r = run_cli("tools", "--tools", "tools.toml", "--check", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "ok: 2 tools\n"), r.stderr
    r = run_cli("tools", cwd=tmp_path, env={"R2D2_TOOLS": str(tmp_path / "tools.toml")})
    assert r.returncode == 0 and r.stdout.startswith("2 tools in ") and "set_volume" in r.stdout
    r = run_cli("tools", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "r2d2voice: error: tools: no tools file: give --tools PATH or set " \
                       "R2D2_TOOLS\n"
    (tmp_path / "bad.toml").write_text('builtins = ["teleport"]\n')
    r = run_cli("tools", "--tools", "bad.toml", cwd=tmp_path)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "teleport" in r.stderr


def test_prune_takes_its_age_from_the_flag_or_the_setting(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from r2d2voice.storage.database import Store

    db = tmp_path / "c.db"
    with Store.open(db, now=lambda: datetime(2020, 1, 1, tzinfo=timezone.utc)) as store:
        sid = store.write.start_session(backend="local", model="local", voice=None)
        store.write.end_session(sid)
    r = run_cli("prune", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 2 and "--older-than AGE" in r.stderr
    r = run_cli("prune", "--db", str(db), "--older-than", "36500d", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("nothing older than "), r.stderr
    r = run_cli("prune", "--db", str(db), cwd=tmp_path, env={"R2D2_RETENTION_DAYS": "30"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pruned 1 session"), r.stdout


def test_ship_then_read_the_fleet_by_device(pg_server, tmp_path: Path) -> None:
    """``ship --to`` (password from the env file, never shown) and the report commands'
    ``--db postgresql://… --device``."""
    from pg import PASSWORD

    from r2d2voice.storage.database import Store

    db = tmp_path / "c.db"
    with Store.open(db) as store:
        sid = store.write.start_session(backend="local", model="local", voice=None)
        store.write.upsert_message(sid, role="user", item_id="i1", seq=1, text="hello fleet")
        store.write.end_session(sid)
    url = pg_server.url(pg_server.create_database())
    (tmp_path / ".env").write_text(f"R2D2_SHIP_URL={url}\nR2D2_DEVICE_ID=r2-kitchen\n")
    r = run_cli("--log-level", "DEBUG", "ship", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    r = run_cli("sessions", "--db", url, "--device", "r2-kitchen", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [header, row] = r.stdout.splitlines()
    assert header.split()[0] == "DEVICE" and row.split()[:2] == ["r2-kitchen", sid]
    r = run_cli("export", "--db", url, "--device", "r2-kitchen", cwd=tmp_path)
    assert r.returncode == 0 and '"text": "hello fleet"' in r.stdout, r.stderr
    assert '"device_id": "r2-kitchen"' in r.stdout
    r = run_cli("stats", "--db", url, "--device", "r2-elsewhere", cwd=tmp_path)
    assert r.returncode == 2 and "no robot 'r2-elsewhere'" in r.stderr
    assert PASSWORD not in r.stderr
    r = run_cli("export", "--device", "r2-kitchen", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 2 and "use it with --db postgresql://" in r.stderr
