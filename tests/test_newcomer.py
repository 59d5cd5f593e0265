"""What a newcomer hit, tried as a new user would (the CLI in a subprocess, real sockets, real
SQLite): each is one clean line with the documented exit status, or simply works now."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
import trio
from support import ROOT, SAMPLES, clean_env, cli, local_backend, require_tool, run_cli

from r2d2voice.cli.main import main
from r2d2voice.errors import RuntimeFailure
from r2d2voice.link.transport import Endpoint, open_realtime
from r2d2voice.storage.database import Store

HELLO = SAMPLES / "hello.wav"


def one_line(stderr: str) -> str:
    """The single line of an error (no traceback, nothing else)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def make_db(path: Path, messages: int, size: int = 200) -> None:
    with Store.open(path) as store:
        sid = store.write.start_session(backend="local", model="local", voice=None)
        for seq in range(1, messages + 1):
            store.write.upsert_message(sid, role="user", item_id=f"i{seq}", seq=seq,
                                       text=f"message {seq} " + "x" * size)
        store.write.end_session(sid)


def test_export_into_a_pipe_closed_early_exits_quietly(tmp_path: Path) -> None:
    """``r2d2voice export | head -1``: no BrokenPipeError traceback, no finalizer noise."""
    db = tmp_path / "c.db"
    make_db(db, 200, size=4000)  # ~800 KB of JSONL: far more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "r2d2voice", "export", "--db", str(db)],
                            cwd=tmp_path, env=clean_env(HOME=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"session_id": ')
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == b""


def test_a_database_one_may_read_but_not_write_is_exported(tmp_path: Path) -> None:
    """Another user's 0644 database in their 0755 directory: read as it is, nothing created."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    db = theirs / "conversations.db"
    make_db(db, 3)
    before = sorted(p.name for p in theirs.iterdir())
    argv = [sys.executable, "-m", "r2d2voice", "export", "--db", str(db)]
    if os.geteuid() == 0:  # root writes anywhere: make it another user's, drop the override
        shutil.chown(theirs, "nobody")
        shutil.chown(db, "nobody")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]
    db.chmod(0o644)
    theirs.chmod(0o755 if os.geteuid() == 0 else 0o555)
    try:
        r = subprocess.run(argv, cwd=tmp_path, env=clean_env(HOME=str(tmp_path)),
                           capture_output=True, text=True, timeout=60)
    finally:
        theirs.chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and r.stderr == ""
    assert sorted(p.name for p in theirs.iterdir()) == before


def test_export_until_the_end_of_time(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_db(db, 2)
    r = run_cli("export", "--db", str(db), "--until", "9999-12-31", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2


def test_serve_local_on_an_unknown_host_is_exit_2(tmp_path: Path) -> None:
    r = run_cli("serve-local", "--host", "no-such-host.invalid", "--port", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(
        "r2d2voice: error: cannot listen on no-such-host.invalid:0: ")


def test_serve_local_script_and_faults_reach_the_backend(tmp_path: Path) -> None:
    r = run_cli("serve-local", "--port", "0", "--fault", "nope", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr).startswith("r2d2voice: error: --fault nope: unknown fault 'nope'")
    (tmp_path / "script.json").write_text("[{\"sing\": 1}]")
    r = run_cli("serve-local", "--port", "0", "--script", "script.json", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == ("r2d2voice: error: script.json: turn 1: unknown key 'sing' "
                                  "(known: arguments, call, hear, say)")


def test_an_http_url_is_a_bad_invocation(tmp_path: Path) -> None:
    r = run_cli("replay", str(HELLO), "--url", "http://127.0.0.1:8765/v1/realtime",
                cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(
        "r2d2voice: error: --url http://127.0.0.1:8765/v1/realtime: expected a ws:// or wss://")


async def test_a_url_at_a_local_backend_needs_no_api_key(tmp_path: Path) -> None:
    async with local_backend(realtime_factor=20) as url:
        r = await cli("replay", str(HELLO), "--url", url, "--db", str(tmp_path / "c.db"),
                      cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert "1 turn answered" in r.stdout.decode()


async def test_the_openai_service_still_needs_the_key_and_nothing_is_stored(
    tmp_path: Path
) -> None:
    r = await cli("replay", str(HELLO), "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert r.returncode == 3
    assert "OPENAI_API_KEY is not set" in one_line(r.stderr.decode())
    assert not (tmp_path / "c.db").exists()  # a configuration error leaves no database behind


async def test_a_rejected_key_is_not_stored_as_an_error_of_the_session(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    async with local_backend(api_key="the-right-key") as url:
        r = await cli("replay", str(HELLO), "--url", url, "--db", str(db), cwd=tmp_path,
                      env=clean_env(HOME=str(tmp_path), OPENAI_API_KEY="a-wrong-key"))
    assert r.returncode == 3, r.stderr.decode()
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM errors").fetchone() == (0,)
    con.close()


async def test_local_sessions_name_no_openai_model_and_replies_are_private(
    tmp_path: Path
) -> None:
    db = tmp_path / "c.db"
    r = await cli("replay", str(HELLO), "--backend", "local", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    r = await cli("sessions", "--db", str(db), cwd=tmp_path)
    [row] = r.stdout.decode().splitlines()[1:]
    assert row.split()[-2:] == ["local", "local"]  # BACKEND, MODEL
    # the reply WAV is as private as the database
    assert (tmp_path / "hello.reply.wav").stat().st_mode & 0o777 == 0o600
    assert db.stat().st_mode & 0o777 == 0o600


async def test_ctrl_c_during_a_replay_is_exit_130(tmp_path: Path) -> None:
    async with local_backend(realtime_factor=20) as url, trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "r2d2voice", "replay", str(SAMPLES / "two_turns.wav"),
             "--speed", "realtime", "--url", url, "--db", str(tmp_path / "c.db")],
            cwd=tmp_path, env=clean_env(HOME=str(tmp_path)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, check=False, task_status=task_status))
        out = b""
        with trio.fail_after(30):
            while b"you: " not in out:  # the first turn was heard
                out += await proc.stdout.receive_some(4096)
        proc.send_signal(signal.SIGINT)
        err = b""
        with trio.fail_after(20):
            async for chunk in proc.stderr:
                err += chunk
            await proc.wait()
    assert proc.returncode == 130
    last = err.decode().strip().splitlines()[-1]
    assert last == (f"r2d2voice: error: interrupted by SIGINT before the end of "
                    f"{SAMPLES / 'two_turns.wav'}; what was said is stored")


@pytest.mark.parametrize("suffix", [".flac", ".mp3"])
def test_reply_wavs_are_named_by_the_whole_file_name(tmp_path: Path, suffix: str) -> None:
    from r2d2voice.appliance.replay_file import default_out_path

    os.chdir(tmp_path)
    assert default_out_path(Path(f"/x/hello{suffix}")) == \
        tmp_path / f"hello{suffix}.reply.wav"
    assert default_out_path(Path("/x/hello.WAV")) == tmp_path / "hello.reply.wav"


def test_an_out_file_named_as_another_format_is_refused(tmp_path: Path) -> None:
    r = run_cli("replay", str(HELLO), "--backend", "local", "--out", "x.mp3",
                "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == ("r2d2voice: error: --out x.mp3: replies are written as WAV; "
                                  "name the file .wav")
    assert not (tmp_path / "x.mp3").exists() and not (tmp_path / "c.db").exists()


# -- a failed connection says what failed ---------------------------------------------------


async def connect_error(url: str, timeout: float = 5) -> str:
    with pytest.raises(RuntimeFailure) as err:
        async with open_realtime(Endpoint(url, "m", "k"), connect_timeout=timeout):
            pass
    return str(err.value)


async def test_connection_failures_say_what_failed(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        assert await connect_error(f"ws://127.0.0.1:{port}/v1/realtime") == (
            f"cannot connect to ws://127.0.0.1:{port}/v1/realtime: connection refused "
            "(nothing listens on that port)")
    message = await connect_error("ws://no-such-host.invalid/v1/realtime")
    assert message.startswith("cannot connect to ws://no-such-host.invalid/v1/realtime: "
                              "DNS lookup failed (")

    async def not_found(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, not_found, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        assert await connect_error(f"ws://127.0.0.1:{port}/v2/realtime") == (
            f"the Realtime service at ws://127.0.0.1:{port}/v2/realtime refused the connection "
            "(HTTP 404)")
        nursery.cancel_scope.cancel()


async def test_a_certificate_tls_does_not_accept_is_named(tmp_path: Path) -> None:
    import ssl

    require_tool("openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def tls(stream: trio.SocketStream) -> None:
        server = trio.SSLStream(stream, context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):  # the client refuses our cert
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, tls, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        # trio-websocket only times out on a TLS failure; then the transport asks TLS alone
        message = await connect_error(f"wss://localhost:{port}/v1/realtime", timeout=0.5)
        nursery.cancel_scope.cancel()
    assert re.fullmatch(rf"cannot connect to wss://localhost:{port}/v1/realtime: TLS "
                        r"certificate not accepted \(self.signed certificate\)", message), message


# -- documentation names only options that exist --------------------------------------------

#: Options of other programs the documents show (systemctl, pip).
FOREIGN = {"--user", "--now", "--kill-whom"}
DOCS = [ROOT / "README.md", ROOT / ".env.example", ROOT / "data" / "samples" / "README.md",
        ROOT / "systemd" / "r2d2voice.env.example"]


def _options(command: click.Command) -> set[str]:
    found = {opt for p in command.params for opt in [*p.opts, *p.secondary_opts]}
    for sub in getattr(command, "commands", {}).values():
        found |= _options(sub)
    return found | {"--help", "--version"}


def test_every_documented_option_exists() -> None:
    known = _options(main)
    for doc in DOCS:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", doc.read_text())) - FOREIGN
        assert named <= known, f"{doc.name} names options that do not exist: {named - known}"


def test_a_stop_clears_the_progress_bar_before_the_log_line() -> None:
    import io

    from r2d2voice.appliance.context import Stopper
    from r2d2voice.appliance.replay_file import TextConsole
    from r2d2voice.appliance.signals import stopped_by_signal

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    console = TextConsole(out=io.StringIO(), err=err)
    stopper = Stopper()
    stopper.on_stop(console.stop)
    console.progress(0.5)
    assert err.getvalue().endswith(" 50% ")
    stopper.stop("SIGINT")  # what with_signals does, before it logs "SIGINT: finishing up"
    assert err.getvalue().endswith("\r" + " " * 40 + "\r")  # the bar is gone
    console.progress(0.6)  # a late frame draws no new bar under the log lines
    assert err.getvalue().endswith("\r" + " " * 40 + "\r")
    assert stopped_by_signal(stopper) == signal.SIGINT
