"""``r2d2voice wake``: the control socket a ``run`` serves, SIGUSR1, and the pid-file fallback,
on real Unix sockets and real signals."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support import clean_env, cli

from r2d2voice.errors import ConfigError, RuntimeFailure
from r2d2voice.system.control import (
    PID_NAME,
    SOCKET_NAME,
    runtime_dir,
    send_wake,
    serve_control,
)


async def serving(nursery: trio.Nursery, on_wake: Callable[[], object],
                  directory: Path) -> Path | None:
    """Start serve_control in ``nursery``; its socket path (None: not serving one)."""
    return await nursery.start(functools.partial(serve_control, on_wake, directory=directory))


def test_the_runtime_directory_follows_systemd_then_xdg_then_tmp(tmp_path: Path) -> None:
    assert runtime_dir({"RUNTIME_DIRECTORY": "/run/r2d2voice:/x"}) == Path("/run/r2d2voice")
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/r2d2voice")
    made = runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}, create=True)
    assert made == tmp_path / "r2d2voice" and made.is_dir()
    assert runtime_dir({}).name == f"r2d2voice-{os.getuid()}"


def test_a_tmp_runtime_directory_others_can_enter_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    shared = tmp_path / f"r2d2voice-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="not a private"):
        runtime_dir({})
    shared.chmod(0o700)
    assert runtime_dir({}, create=True) == shared


async def test_wake_over_the_socket_and_by_sigusr1(tmp_path: Path) -> None:
    woken: list[str] = []
    async with trio.open_nursery() as nursery:
        path = await serving(nursery, lambda: woken.append("wake"), tmp_path)
        assert path == tmp_path / SOCKET_NAME
        assert (tmp_path / PID_NAME).read_text().strip() == str(os.getpid())
        done = await trio.to_thread.run_sync(send_wake, tmp_path)
        assert done == f"woke the r2d2voice run listening on {path}" and woken == ["wake"]
        os.kill(os.getpid(), signal.SIGUSR1)
        with trio.fail_after(5):
            while len(woken) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert woken == ["wake", "wake"]
    # a clean exit leaves nothing behind for the next run to trip over
    assert not path.exists() and not (tmp_path / PID_NAME).exists()


async def test_unknown_commands_and_silent_clients_change_nothing(tmp_path: Path) -> None:
    woken: list[int] = []
    async with trio.open_nursery() as nursery:
        path = await serving(nursery, lambda: woken.append(1), tmp_path)
        stream = await trio.open_unix_socket(str(path))
        await stream.send_all(b"reboot\n")
        reply = await stream.receive_some(200)
        assert reply == b"error: unknown command 'reboot' (known: wake)\n"
        await stream.aclose()
        silent = await trio.open_unix_socket(str(path))  # says nothing: dropped, no wake
        assert await trio.to_thread.run_sync(send_wake, tmp_path)  # others still served
        await silent.aclose()
        nursery.cancel_scope.cancel()
    assert woken == [1]


async def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(tmp_path: Path) -> None:
    (tmp_path / SOCKET_NAME).write_text("left by a crashed run")
    first: list[int] = []
    second: list[int] = []
    async with trio.open_nursery() as nursery:
        path = await serving(nursery, lambda: first.append(1), tmp_path)
        assert path == tmp_path / SOCKET_NAME
        # a second run on the same directory does not steal the first one's socket
        assert await serving(nursery, lambda: second.append(1), tmp_path) is None
        await trio.to_thread.run_sync(send_wake, tmp_path)
        nursery.cancel_scope.cancel()
    assert first == [1] and second == []


def test_without_a_socket_the_pid_file_gets_sigusr1_if_it_is_r2d2voice(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="no running `r2d2voice run` found"):
        send_wake(tmp_path)
    # a stale pid file naming some other process: never signalled (SIGUSR1 would kill it)
    (tmp_path / PID_NAME).write_text(f"{os.getppid()}\n")
    with pytest.raises(RuntimeFailure, match="no running"):
        send_wake(tmp_path)


async def test_the_wake_command_reaches_a_run(tmp_path: Path) -> None:
    woken: list[int] = []
    env = clean_env(HOME=str(tmp_path), RUNTIME_DIRECTORY=str(tmp_path))
    async with trio.open_nursery() as nursery:
        await serving(nursery, lambda: woken.append(1), tmp_path)
        r = await cli("wake", cwd=tmp_path, env=env)
        nursery.cancel_scope.cancel()
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"woke the r2d2voice run listening on {tmp_path / SOCKET_NAME}\n"
    assert woken == [1]
    r = await cli("wake", cwd=tmp_path, env=env)
    assert r.returncode == 1
    assert r.stderr.decode().startswith("r2d2voice: error: no running `r2d2voice run` found")


async def test_sigusr1_through_the_pid_file_wakes_a_process(tmp_path: Path) -> None:
    """A run whose socket is gone still has its pid file: ``wake`` signals it."""
    code = (
        "import trio\n"
        "from r2d2voice.system.control import serve_control\n"
        "async def main():\n"
        "    woke = trio.Event()\n"
        "    async with trio.open_nursery() as n:\n"
        "        await n.start(serve_control, woke.set)\n"
        "        print('ready', flush=True)\n"
        "        await woke.wait()\n"
        "        print('woken', flush=True)\n"
        "        n.cancel_scope.cancel()\n"
        "trio.run(main)\n"
    )
    env = clean_env(RUNTIME_DIRECTORY=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    async with trio.open_nursery() as nursery:
        # "r2d2voice" on its command line: what the pid check looks for
        proc = await nursery.start(functools.partial(
            trio.run_process, [sys.executable, "-c", code, "r2d2voice"], env=env,
            stdout=subprocess.PIPE, check=False))
        line = b""
        with trio.fail_after(20):
            while b"ready\n" not in line:
                line += await proc.stdout.receive_some(64)
        (tmp_path / SOCKET_NAME).unlink()  # only the pid file is left to find it by
        done = await trio.to_thread.run_sync(send_wake, tmp_path)
        assert done == f"sent SIGUSR1 to the r2d2voice run (pid {proc.pid})"
        with trio.fail_after(20):
            while b"woken\n" not in line:
                line += await proc.stdout.receive_some(64)
            await proc.wait()
    assert proc.returncode == 0
