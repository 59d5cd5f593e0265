"""Idle CPU: ``r2d2voice run`` listening to a silent room, against a bare PortAudio capture.

Starts a private PulseAudio rig (``tests/pulse.py``: null sinks ``mic`` and ``speaker``, the
default source ``mic.monitor`` hears nothing but digital silence) and one ``r2d2voice
serve-local`` on a free loopback port (its CPU is not counted). Each round then starts, side by
side and each in its own process with the rig's environment (PortAudio reaches the rig through
ALSA's pulse plugin):

- ``floor``: a bare ``sounddevice.InputStream`` on the default input, opened the way the
  appliance opens it (device default rate, up to 2 channels, float32, 20 ms blocks, default
  latency), its callback only counting blocks;
- ``always``: ``r2d2voice run --backend openai --url ws://127.0.0.1:PORT/v1/realtime`` with a
  dummy ``OPENAI_API_KEY`` and a temp ``R2D2_DB``, streaming the silence to the local backend
  (with the default ``R2D2_ECHO=aec``: the echo canceller rests while nothing plays);
- ``wake``: ``r2d2voice run --listen wake`` (the same with the wake-word gate), once the CLI has
  ``--listen``; until then it is reported as not implemented.

After every process is ready (the floor's stream runs, ``run`` logged ``ready:``) and a warm-up,
each process's user+sys CPU (``/proc/PID/stat``, all threads) is read at the start and the end of
the same window. Prints per mode the median CPU % of one core over the rounds, and the ratio to
the floor of the same round (median of those ratios). Targets: ``always`` <= 3x, ``wake`` <= 2x.

    .venv/bin/python bench/idle.py                        # 3 rounds of 20 s, ~2 min
    .venv/bin/python bench/idle.py --rounds 1 --window 10 --keep
    PYTHONPATH=/tmp/wt .venv/bin/python bench/idle.py     # another checkout's r2d2voice
    .venv/bin/python bench/idle.py --profile /tmp/idle    # py-spy the modes instead (needs py-spy)

Nothing here imports r2d2voice: the script measures whatever tree the children import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from pulse import PulseRig, unavailable_reason  # noqa: E402  (tests/ holds the rig)

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "r2d2voice")
BLOCK_MS = 20
TARGETS = {"always": 3.0, "wake": 2.0}
TICK = os.sysconf("SC_CLK_TCK")
#: settings a developer's shell may hold; no child of the bench sees them
AMBIENT = ("R2D2_", "OPENAI", "REALTIME_")

FLOOR = """
import json, signal, sys, sounddevice as sd
dev = sd.query_devices(kind="input")
rate = int(dev["default_samplerate"])
channels = max(1, min(2, int(dev["max_input_channels"])))
blocks = 0
def callback(indata, frames, time, status):
    global blocks
    blocks += 1
block = rate * int(sys.argv[1]) // 1000
stream = sd.InputStream(device=dev["index"], samplerate=rate, channels=channels,
                        dtype="float32", blocksize=block, callback=callback)
stream.start()
print(json.dumps({"device": dev["name"], "rate": rate, "channels": channels}), flush=True)
signal.signal(signal.SIGTERM, lambda *a: None)
signal.pause()
stream.close()
print(json.dumps({"blocks": blocks}), flush=True)
"""


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User+sys CPU seconds of a live process, all its threads (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


@dataclass
class Child:
    """One measured process: how it is started and how we know it is ready."""

    name: str
    argv: list[str]
    ready: re.Pattern[str]
    log: Path
    db: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    start_cpu: float = 0.0
    window_cpu: float = 0.0

    def start(self, env: dict[str, str], cwd: Path) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def is_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RoundFailed(f"{self.name} exited with {self.proc.returncode} before it was "
                              f"ready: {tail(self.output())}")
        return bool(self.ready.search(self.output()))

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; the exit code (a kill after ``timeout`` is reported as -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RoundFailed(Exception):
    """A round that could not be measured (reported, left out of the figures)."""


def tail(text: str, n: int = 400) -> str:
    return " | ".join(text.strip().splitlines())[-n:]


def clean_env(env: dict[str, str], pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in env.items() if not k.startswith(AMBIENT)}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


def start_server(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    errors = cwd / "serve-local.log"
    with open(errors, "wb") as err:
        proc = subprocess.Popen([CLI, "serve-local", "--port", "0"], env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(ws://\S+)", line)
    if not m:
        proc.kill()
        proc.wait()
        raise SystemExit(f"serve-local did not announce its address: {line!r} "
                         f"{tail(errors.read_text(errors='replace'))}")
    return proc, m.group(1)


def listen_modes(env: dict[str, str], cwd: Path) -> dict[str, list[str] | None]:
    """The run arguments per mode; None for a mode the CLI does not have yet."""
    helptext = subprocess.run([CLI, "run", "--help"], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=60).stdout
    if "--listen" not in helptext:
        return {"always": [], "wake": None}
    return {"always": ["--listen", "always"], "wake": ["--listen", "wake"]}


def children(modes: dict[str, list[str] | None], url: str, tmp: Path, n: int,
             block_ms: int) -> list[Child]:
    procs = [Child("floor", [sys.executable, "-c", FLOOR, str(block_ms)], re.compile(r'"rate"'),
                   tmp / f"floor{n}.log")]
    for mode, extra in modes.items():
        if extra is None:
            continue
        db = tmp / f"{mode}{n}.db"
        argv = [CLI, "run", "--backend", "openai", "--url", url, "--db", str(db), *extra]
        procs.append(Child(mode, argv, re.compile(r"\bready:"), tmp / f"{mode}{n}.log",
                           db))
    return procs


def frames_sent(db: Path) -> int | None:
    """Frames the run's sessions report as sent (None if the database says nothing)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT metadata FROM sessions").fetchall()
    except sqlite3.Error:
        return None
    sent = [json.loads(m or "{}").get("stats", {}).get("frames_sent") for (m,) in rows]
    return sum(s for s in sent if isinstance(s, int)) if any(isinstance(s, int)
                                                            for s in sent) else None


# --------------------------------------------------------------------------- one round


@dataclass
class Round:
    cpu: dict[str, float] = field(default_factory=dict)  # mode -> CPU % of one core
    notes: list[str] = field(default_factory=list)


def wait_ready(procs: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(procs)
    while waiting:
        waiting = [c for c in waiting if not c.is_ready()]
        if waiting and time.monotonic() > deadline:
            raise RoundFailed(f"not ready within {timeout:.0f} s: "
                              + "; ".join(f"{c.name}: {tail(c.output(), 200)}" for c in waiting))
        time.sleep(0.1)


def measure_round(procs: list[Child], env: dict[str, str], tmp: Path, warmup: float,
                  window: float, profile: Path | None) -> Round:
    result = Round()
    try:
        for child in procs:
            child.start(env, tmp)
        wait_ready(procs, timeout=60)
        time.sleep(warmup)
        if profile is not None:
            profile_window(procs, window, profile, result)
        else:
            t0 = time.monotonic()
            for child in procs:
                assert child.proc is not None
                child.start_cpu = cpu_seconds(child.proc.pid)
            time.sleep(window)
            elapsed = time.monotonic() - t0
            for child in procs:
                assert child.proc is not None
                if child.proc.poll() is not None:
                    raise RoundFailed(f"{child.name} exited during the window: "
                                      f"{tail(child.output())}")
                child.window_cpu = cpu_seconds(child.proc.pid) - child.start_cpu
                result.cpu[child.name] = 100.0 * child.window_cpu / elapsed
    finally:
        codes = {c.name: c.stop() for c in procs if c.proc is not None}
    for child in procs:
        code = codes.get(child.name)
        if code not in (0, None):
            raise RoundFailed(f"{child.name} exited with {code} on SIGTERM: "
                              f"{tail(child.output())}")
        if child.name == "floor":
            m = re.search(r'"blocks": (\d+)', child.output())
            if not m or int(m.group(1)) == 0:
                raise RoundFailed(f"the floor captured nothing: {tail(child.output())}")
        elif child.db is not None:
            sent = frames_sent(child.db)
            if sent == 0:
                raise RoundFailed(f"{child.name} sent no frames: {tail(child.output())}")
            result.notes.append(f"{child.name}: {sent if sent is not None else '?'} frames sent")
    return result


def profile_window(procs: list[Child], window: float, out: Path, result: Round) -> None:
    """py-spy each r2d2voice process over the window (collapsed stacks, one file per mode)."""
    pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("--profile needs py-spy (.venv/bin/pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for child in procs:
        if child.name == "floor":
            continue
        assert child.proc is not None
        path = out / f"{child.name}.txt"
        spies.append(subprocess.Popen(
            [pyspy, "record", "--pid", str(child.proc.pid), "--duration", str(int(window)),
             "--rate", "250", "--threads", "--nonblocking", "--format", "raw", "-o", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        result.notes.append(f"{child.name}: collapsed stacks in {path}")
    for spy in spies:
        spy.wait(timeout=window + 30)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--window", type=float, default=20.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after ready")
    parser.add_argument("--block-ms", type=int, default=BLOCK_MS,
                        help="the floor's PortAudio block (keep it equal to the appliance's)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="one round, py-spy (collapsed stacks into DIR) instead of figures")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, dbs)")
    args = parser.parse_args()

    reason = unavailable_reason()
    if reason:
        sys.exit(reason)
    tmp = Path(tempfile.mkdtemp(prefix="r2d2-idle-"))
    server = None
    try:
        with PulseRig(tmp / "rig") as rig:
            env = clean_env(rig.env, os.environ.get("PYTHONPATH"))
            run_env = {**env, "OPENAI_API_KEY": "sk-bench-not-a-key", "R2D2_LOG_LEVEL": "INFO"}
            server, url = start_server(env, tmp)
            modes = listen_modes(run_env, tmp)
            print(f"rig: {rig.root}; server: {url} (its CPU is not counted)")
            rounds: list[Round] = []
            total = 1 if args.profile else args.rounds
            for n in range(total):
                procs = children(modes, url, tmp, n, args.block_ms)
                try:
                    res = measure_round(procs, run_env, tmp, args.warmup, args.window,
                                        args.profile)
                except RoundFailed as exc:
                    print(f"  round {n + 1}: FAILED: {exc}", flush=True)
                    continue
                rounds.append(res)
                figures = "  ".join(f"{k} {v:5.2f}%" for k, v in res.cpu.items())
                print(f"  round {n + 1}/{total}: {figures}  ({'; '.join(res.notes)})",
                      flush=True)
            if args.profile:
                return
            report(rounds, modes, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(rounds: list[Round], modes: dict[str, list[str] | None],
           args: argparse.Namespace) -> None:
    if not rounds:
        sys.exit("no round succeeded; no figures")
    floor = statistics.median(r.cpu["floor"] for r in rounds)
    print(f"\nmedian of {len(rounds)} round(s), {args.window:.0f} s window after "
          f"{args.warmup:.0f} s warm-up; CPU % of one core (user+sys, all threads)")
    print(f"floor (bare PortAudio capture): {floor:5.2f}%")
    missed = False
    for mode in ("always", "wake"):
        if modes.get(mode) is None:
            print(f"{mode}: not implemented yet")
            continue
        cpu = statistics.median(r.cpu[mode] for r in rounds)
        ratio = statistics.median(r.cpu[mode] / r.cpu["floor"] for r in rounds)
        met = ratio <= TARGETS[mode]
        missed |= not met
        print(f"{mode}: {cpu:5.2f}%  ratio {ratio:.1f}x the floor  (target <= "
              f"{TARGETS[mode]:g}x: {'met' if met else 'NOT met'})")
    if len(rounds) < args.rounds:
        print(f"warning: {args.rounds - len(rounds)} round(s) failed (see above)")


if __name__ == "__main__":
    main()
