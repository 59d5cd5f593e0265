"""Run one command tool: argv without a shell, arguments on stdin, its own process group, a
minimal environment, capped output, and a timeout that ends the whole group."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import signal
import subprocess
from dataclasses import dataclass

import trio

OUTPUT_CAP = 16 * 1024
STDERR_CAP = 4 * 1024
GRACE_S = 1.0  # SIGTERM → SIGKILL
_POLL_S = 0.02
_READ_SIZE = 64 * 1024
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Outcome:
    """How a command ended. ``exit_code`` is None after a timeout; negative for a signal."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool


def minimal_env() -> dict[str, str]:
    """PATH, the locale and HOME=/: nothing else reaches a tool (no API key, no secrets)."""
    env = {"PATH": os.environ.get("PATH") or _DEFAULT_PATH, "HOME": "/"}
    env["LANG"] = os.environ.get("LANG") or "C.UTF-8"
    if os.environ.get("LC_ALL"):
        env["LC_ALL"] = os.environ["LC_ALL"]
    return env


class _Capped:
    """Keeps the first ``cap`` bytes of a stream and counts the rest (which is read and dropped,
    so a chatty process never blocks on a full pipe)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.dropped = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(bytes(self.data), final=not self.dropped)
        if self.dropped:
            text += f"…[output cut at {self.cap // 1024} KiB]"
        return text


async def run_command(argv: tuple[str, ...], payload: bytes, *, timeout_s: float,
                      grace_s: float = GRACE_S, cap: int = OUTPUT_CAP) -> Outcome:
    """Run ``argv`` with ``payload`` on stdin. Past ``timeout_s`` (or if this task is cancelled)
    the process group gets SIGTERM, then SIGKILL after ``grace_s``; when the command exits, what
    is left of its group is ended the same way, so no process outlives its call."""
    out, err = _Capped(cap), _Capped(STDERR_CAP)
    proc = await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=minimal_env(), cwd="/", start_new_session=True)
    try:
        with trio.move_on_after(timeout_s) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed, proc.stdin, payload)
                nursery.start_soon(_drain, proc.stdout, out)
                nursery.start_soon(_drain, proc.stderr, err)
                await proc.wait()
                # Leftover children (``cmd &``) would hold the pipes open: end them now.
                await _end_group(proc, grace_s)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2 * grace_s + 1):
            await _end_group(proc, grace_s)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
            await proc.wait()
    timed_out = deadline.cancelled_caught
    code = None if timed_out else proc.returncode
    return Outcome(out.text(), err.text(), code, timed_out)


async def _feed(stream: trio.abc.SendStream | None, payload: bytes) -> None:
    assert stream is not None
    async with stream:
        # A tool that does not read its arguments closes the pipe: its business.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(payload)


async def _drain(stream: trio.abc.ReceiveStream | None, sink: _Capped) -> None:
    assert stream is not None
    async with stream:
        while chunk := await stream.receive_some(_READ_SIZE):
            sink.add(chunk)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # macOS reports a group of zombies this way
        return False
    except OSError as exc:  # pragma: no cover - unexpected errno
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


async def _end_group(proc: trio.Process, grace_s: float) -> None:
    """SIGTERM the process group, wait up to ``grace_s`` for it to go, then SIGKILL it."""
    pgid = proc.pid  # start_new_session: the tool leads its own group
    if not _signal_group(pgid, signal.SIGTERM):
        return
    gone = False
    try:
        with trio.move_on_after(grace_s):
            while _signal_group(pgid, 0) and await trio.to_thread.run_sync(
                    _has_live_member, pgid):
                await trio.sleep(_POLL_S)
            gone = True
    finally:  # past the grace, or cancelled by an enclosing deadline: no more waiting
        if not gone:
            _signal_group(pgid, signal.SIGKILL)


def _has_live_member(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies awaiting a reaper don't
    count: they hold no pipe and do no work)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: trust kill(0)
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False
