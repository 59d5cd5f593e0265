"""What a newcomer hit, tried as a new user would (the CLI in a subprocess, real sockets, real
SQLite): each is one clean line with the documented exit status, or simply works now."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
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
from support import ROOT, SAMPLES, clean_env, cli, local_backend, require_tool, run_cli, silence

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
    assert proc.wait(timeout=60) == 0  # a normal end (issue 17.4)
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
                                  "(known: arguments, call, hear, mcp, say)")


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


# -- the second round (issue 17) ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["same", "symlink", "hardlink"])
def test_export_never_writes_over_its_database(tmp_path: Path, name: str) -> None:
    """``export --db a.db --output a.db`` (or a link to it) is refused; the database is intact."""
    db = tmp_path / "a.db"
    make_db(db, 3)
    before = db.read_bytes()
    target = {"same": db, "symlink": tmp_path / "link.jsonl",
              "hardlink": tmp_path / "hard.jsonl"}[name]
    if name == "symlink":
        target.symlink_to(db)
    elif name == "hardlink":
        target.hardlink_to(db)
    r = run_cli("export", "--db", "a.db", "--output", target.name, cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == (f"r2d2voice: error: --output {target.name} is the database "
                                  "(a.db): exporting would overwrite it; write the export to "
                                  "another file")
    assert db.read_bytes() == before
    (tmp_path / "a.jsonl").write_text("an older export\n")  # another file is replaced
    r = run_cli("export", "--db", "a.db", "--output", "a.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and len((tmp_path / "a.jsonl").read_text().splitlines()) == 3


async def test_a_local_backend_at_a_url_is_recorded_as_local_and_never_priced(
    tmp_path: Path
) -> None:
    """``replay --url ws://…`` at ``serve-local`` (backend openai by default): the session
    records what the service says it is, and ``usage`` bills nothing."""
    db = tmp_path / "c.db"
    async with local_backend(realtime_factor=20) as url:
        r = await cli("replay", str(SAMPLES / "two_turns.wav"), "--url", url, "--db", str(db),
                      cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    r = await cli("sessions", "--db", str(db), cwd=tmp_path)
    [row] = r.stdout.decode().splitlines()[1:]
    assert row.split()[-2:] == ["local", "local"]  # BACKEND, MODEL: what the service said
    r = await cli("usage", "--db", str(db), "--format", "json", cwd=tmp_path)
    import json

    report = json.loads(r.stdout)
    assert report["total"]["responses"] == 2 and report["total"]["cost_usd"] == 0
    r = await cli("usage", "--db", str(db), cwd=tmp_path)
    assert "local backend: not billed" in r.stdout.decode()
    from r2d2voice.localbackend.session_config import LOCAL_MODEL
    from r2d2voice.storage.writer import LOCAL

    assert LOCAL_MODEL == LOCAL  # what the backend says is what the store recognises


FLEET = "postgresql://r2:s3cret-pw@127.0.0.1:1/fleet"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_replay_and_prune_refuse_a_fleet_server_as_their_database(tmp_path: Path,
                                                                  how: str) -> None:
    """Nothing is made under a name like ``postgresql:/…``: exit 2, saying what --db takes."""
    args, env = (["--db", FLEET], {}) if how == "flag" else ([], {"R2D2_DB": FLEET})
    named = "--db" if how == "flag" else "R2D2_DB in the environment"
    r = run_cli("replay", str(HELLO), "--backend", "local", *args, cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert one_line(r.stderr) == (
        f"r2d2voice: error: {named} names a fleet server; --db takes a SQLite path: replay "
        "writes this robot's database; the fleet is written by `r2d2voice ship --to URL` (and "
        "by run, with R2D2_SHIP_URL)")
    assert r.stdout == ""  # no conversation was held
    r = run_cli("prune", "--older-than", "30d", *args, cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert one_line(r.stderr) == (f"r2d2voice: error: {named} names a fleet server; prune "
                                  "works on the robot's SQLite file: --db takes its path")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no postgresql: folder, no WAV


def _without_write_access(argv: list[str], folder: Path) -> list[str]:
    """``argv`` run by someone who may not write in ``folder`` (root: without the capability)."""
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
        for child in folder.iterdir():
            shutil.chown(child, "nobody")
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]
    return argv


@pytest.mark.parametrize("where", ["existing", "new", "proc", "empty"])
def test_a_database_that_cannot_be_written_is_refused_before_the_conversation(
    tmp_path: Path, where: str
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    make_db(theirs / "c.db", 1)
    db = {"existing": theirs / "c.db", "new": theirs / "new" / "c.db",
          "proc": Path("/proc/c.db"), "empty": ""}[where]
    argv = [sys.executable, "-m", "r2d2voice", "replay", str(HELLO), "--backend", "local",
            "--db", str(db)]
    argv = _without_write_access(argv, theirs)
    (theirs / "c.db").chmod(0o444)
    theirs.chmod(0o555)
    try:
        r = subprocess.run(argv, cwd=tmp_path, env=clean_env(HOME=str(tmp_path)),
                           capture_output=True, text=True, timeout=60)
    finally:
        theirs.chmod(0o755)
    assert r.returncode == 2
    assert r.stdout == ""  # refused before anything was said: nothing to lose
    expected = {
        "existing": f"cannot write database {db}: permission denied",
        "new": f"cannot write database {db}: cannot create files in {theirs} "
               "(permission denied)",
        "proc": f"cannot write database {db}: cannot create files in /proc (the file system "
                "there takes no new files)",
        "empty": "--db '': an empty path; name the database file (or leave the option out for "
                 "the default)",
    }[where]
    assert one_line(r.stderr) == f"r2d2voice: error: {expected}"
    assert sorted(p.name for p in theirs.iterdir()) == ["c.db"]
    assert not (tmp_path / "hello.reply.wav").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "markdown"])
@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_a_reader_that_stops_early_is_a_normal_end(tmp_path: Path, fmt: str,
                                                   reader: str) -> None:
    """``set -o pipefail; r2d2voice export | head -1`` succeeds: exit 0, nothing on stderr,
    whether the reader leaves after a line or before the first (``| true``)."""
    db = tmp_path / "c.db"
    make_db(db, 200, size=4000)
    command = (f"set -o pipefail; {shlex.quote(sys.executable)} -m r2d2voice export --db c.db "
               f"--format {fmt} | {reader} >/dev/null")
    for _ in range(3):  # where the pipe closes varies from run to run
        r = subprocess.run(["bash", "-c", command], cwd=tmp_path,
                           env=clean_env(HOME=str(tmp_path)), capture_output=True, text=True,
                           timeout=60)
        assert (r.returncode, r.stderr) == (0, "")


def test_a_replay_whose_reader_leaves_still_holds_and_stores_every_turn(
    tmp_path: Path
) -> None:
    """``replay two_turns.wav | head -1``: the second turn is still answered and stored."""
    command = (f"set -o pipefail; {shlex.quote(sys.executable)} -m r2d2voice replay "
               f"{shlex.quote(str(SAMPLES / 'two_turns.wav'))} --backend local --db c.db "
               "| head -1")
    r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=clean_env(HOME=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "you: (speech, 1.8 s)\n", "")
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("SELECT role FROM messages ORDER BY seq").fetchall() == [
        ("user",), ("assistant",), ("user",), ("assistant",)]
    con.close()


@pytest.mark.parametrize("command", [["export", "--db", "c.db"], ["sessions", "--db", "c.db"],
                                     ["usage", "--db", "c.db", "--format", "json"], ["--help"]])
def test_output_to_a_full_disk_is_one_line_exit_1(tmp_path: Path, command: list[str]) -> None:
    make_db(tmp_path / "c.db", 3)
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "r2d2voice", *command], cwd=tmp_path,
                           env=clean_env(HOME=str(tmp_path)), stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 1
    assert one_line(r.stderr) == ("r2d2voice: error: cannot write standard output: no space "
                                  "left on device")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_no_duration_is_a_bad_invocation(tmp_path: Path, value: str) -> None:
    r = run_cli("replay", str(HELLO), "--backend", "local", "--timeout", value,
                "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert r.returncode == 2
    assert re.fullmatch(rf"r2d2voice: error: Invalid value for '--timeout': '{value}' is not "
                        r"a number of seconds \(see .*r2d2voice replay --help\)",
                        one_line(r.stderr)), r.stderr
    assert not (tmp_path / "c.db").exists()


# -- one rule per case (issue 17.10) ------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "replay"])
def test_a_directory_as_database_is_exit_2_on_the_command_line_and_3_in_a_setting(
    tmp_path: Path, command: str
) -> None:
    args = [str(HELLO), "--backend", "local"] if command == "replay" else []
    r = run_cli(command, *args, "--db", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == (f"r2d2voice: error: R2D2_DB (--db) on the command line must "
                                  f"be a file path (not a directory), got '{tmp_path}'")
    r = run_cli(command, *args, cwd=tmp_path, env={"R2D2_DB": str(tmp_path)})
    assert r.returncode == 3
    assert one_line(r.stderr) == (f"r2d2voice: error: R2D2_DB in the environment must be a "
                                  f"file path (not a directory), got '{tmp_path}'")


def test_env_file_is_any_readable_file_and_a_bad_one_is_exit_2(tmp_path: Path) -> None:
    make_db(tmp_path / "c.db", 1)
    (tmp_path / "folder").mkdir()
    for name, message in (("nosuch", "--env-file nosuch: no such file"),
                          ("folder", "--env-file folder: is a directory, not an env file")):
        r = run_cli("--env-file", name, "sessions", "--db", "c.db", cwd=tmp_path)
        assert r.returncode == 2
        assert one_line(r.stderr) == f"r2d2voice: error: {message}"
    r = run_cli("--env-file", "/dev/null", "sessions", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""  # an empty env file
    assert len(r.stdout.splitlines()) == 2


def test_a_bare_r2d2voice_prints_the_help_on_stdout(tmp_path: Path) -> None:
    r = run_cli(cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("Usage: ") and "Commands:" in r.stdout


def test_only_a_misspelt_option_or_command_gets_clicks_usage_block(tmp_path: Path) -> None:
    r = run_cli("replay", str(HELLO), "--dbb", "x.db", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("Usage: ") and "Did you mean '--db'?" in r.stderr
    r = run_cli("exprot", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean 'export'?" in r.stderr
    for args in (["export", "--format", "xml"], ["replay"], ["--log-level", "loud", "wake"]):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2
        assert one_line(r.stderr).startswith("r2d2voice: error: ")


# -- misleading messages (issue 17.11) ----------------------------------------------------------


def test_global_options_work_after_the_command(tmp_path: Path) -> None:
    make_db(tmp_path / "c.db", 1)
    r = run_cli("sessions", "--db", "c.db", "--log-level", "debug", cwd=tmp_path)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    (tmp_path / "fleet.env").write_text("R2D2_DB=c.db\n")
    r = run_cli("sessions", "--env-file", "fleet.env", cwd=tmp_path)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    r = run_cli("--env-file", "nosuch", "sessions", "--env-file", "fleet.env", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # the one after the command wins


def test_an_age_and_a_retention_say_their_least(tmp_path: Path) -> None:
    make_db(tmp_path / "c.db", 1)
    r = run_cli("prune", "--older-than", "0d", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == ("r2d2voice: error: --older-than: '0d' is too young: an age "
                                  "is at least 1 minute (1m), like 30d, 2w, 12h or 90m")
    r = run_cli("prune", "--db", "c.db", cwd=tmp_path, env={"R2D2_RETENTION_DAYS": "0"})
    assert r.returncode == 3
    assert one_line(r.stderr) == ("r2d2voice: error: R2D2_RETENTION_DAYS in the environment "
                                  "must be 'off' (keep everything) or a number of days, at "
                                  "least 0.01 (about 15 minutes), got '0'")


def test_a_ship_url_without_a_password_is_shown(tmp_path: Path) -> None:
    make_db(tmp_path / "c.db", 1)
    r = run_cli("ship", "--to", "notaurl", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 2
    assert one_line(r.stderr) == ("r2d2voice: error: R2D2_SHIP_URL (--to) on the command line "
                                  "must be a postgresql:// URL, got 'notaurl'")
    r = run_cli("ship", "--to", "postgrse://r2:s3cret@h/db", "--db", "c.db", cwd=tmp_path)
    assert "'postgrse://r2:***@h/db'" in one_line(r.stderr) and "s3cret" not in r.stderr


def test_env_file_lines_that_are_no_setting_are_named(tmp_path: Path) -> None:
    make_db(tmp_path / "c.db", 1)
    (tmp_path / ".env").write_bytes(b"R2D2_LOG_LEVEL=INFO\nREALTIME_VOICE=\xff\xfeash\n")
    r = run_cli("sessions", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 3
    assert one_line(r.stderr) == ("r2d2voice: error: cannot read env file "
                                  f"{tmp_path / '.env'}: line 2, byte 16 (0xff) is not UTF-8 "
                                  "text")
    (tmp_path / ".env").write_text("[r2d2]\nR2D2_LOG_LEVEL=INFO\nR2D2_STORE_TEXT\njunk line\n")
    r = run_cli("sessions", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 0
    env = tmp_path / ".env"
    assert [line.split(" ", 2)[2] for line in r.stderr.splitlines()] == [
        f"r2d2voice.system.config: {env} line 1: [r2d2] is a section header, and env files "
        "have none (KEY=value lines only); the line is ignored",
        f"r2d2voice.system.config: {env} line 3: R2D2_STORE_TEXT has no value (expected "
        "R2D2_STORE_TEXT=value); the line is ignored",
        f"r2d2voice.system.config: {env} line 4: cannot parse it (expected KEY=value); the "
        "line is ignored",
    ]


def test_a_wav_cut_short_is_warned_about(tmp_path: Path) -> None:
    data = (SAMPLES / "two_turns.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 3])  # its header says 6 s
    r = run_cli("replay", "cut.wav", "--backend", "local", "--db", "c.db", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("cut.wav is truncated or corrupt after 2.0 s: "
                                                 "what could be read was played")


@pytest.mark.parametrize("listen", ["wake", "always"])
def test_a_replay_without_reply_audio_leaves_an_existing_out_alone(tmp_path: Path,
                                                                   listen: str) -> None:
    """No wake word (or no speech) in the file: the reply WAV of an earlier replay stays."""
    import soundfile

    quiet = tmp_path / "quiet.wav"
    soundfile.write(quiet, silence(2.0), 24000, subtype="PCM_16")
    source = SAMPLES / "two_turns.wav" if listen == "wake" else quiet  # no "hey mycroft"
    r = run_cli("replay", str(SAMPLES / "hello.wav"), "--backend", "local", "--db", "c.db",
                "--out", "reply.wav", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "reply.wav").read_bytes()
    assert len(before) > 10_000
    r = run_cli("replay", str(source), "--backend", "local", "--db", "c.db", "--out",
                "reply.wav", "--listen", listen, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no reply audio (reply.wav left as it was)" in r.stdout
    assert (tmp_path / "reply.wav").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db", "quiet.wav", "reply.wav"]


# -- the documents say what the code does (issue 17.12) ----------------------------------------


def _readme_export_paragraph() -> str:
    text = (ROOT / "README.md").read_text()
    return " ".join(text.split("### `r2d2voice export`", 1)[1].split("###", 1)[0].split())


def test_the_readme_names_every_export_column_and_role() -> None:
    from r2d2voice.reports.export import COLUMNS

    paragraph = _readme_export_paragraph()
    listed = re.search(r"Rows stream in conversation order with `([^`]+)`", paragraph)
    assert listed and tuple(listed.group(1).split(", ")) == COLUMNS
    roles = next(p for p in main.commands["export"].params if p.name == "role")
    assert f"`--role {'|'.join(roles.type.choices)}`" in paragraph  # type: ignore[attr-defined]


def test_the_readme_tool_row_is_what_markdown_export_writes(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    db = tmp_path / "c.db"
    at = datetime(2026, 11, 21, 9, 30, 5, tzinfo=timezone.utc)
    with Store.open(db, now=lambda: at) as store:
        sid = store.write.start_session(backend="local", model="local", voice=None)
        store.write.record_tool_call(sid, call_id="c1", item_id="fc1", response_id="r1", seq=1,
                                     name="turn_head", arguments='{\n  "degrees": -90\n}')
        store.write.record_tool_result(sid, call_id="c1", status="ok", output="turned to -90",
                                       exit_code=0, duration_ms=41)
    r = run_cli("export", "--db", "c.db", "--format", "markdown", cwd=tmp_path)
    [row] = [line for line in r.stdout.splitlines() if line.startswith("🔧")]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"`{row}`" in readme
