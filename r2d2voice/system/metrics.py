"""Prometheus metrics of a run (``R2D2_METRICS=HOST:PORT``), served with prometheus-client.

:class:`Metrics` is what the run calls (``turn()``, ``response(status)``, ``cost(usd)``,
``connected(flag)``, …, or :meth:`Metrics.observe` with each record the link stores); every
metric lives in the object's own registry, so two runs in one process never share one.
:func:`serve_metrics` is a trio task that serves the registry at ``http://HOST:PORT/metrics``
on that address only: prometheus-client's WSGI server runs in its own thread (started through
``trio.to_thread``, shut down with a deadline on the way out). A busy or unusable address is a
:class:`~r2d2voice.errors.ConfigError` (exit 3) before anything else starts.

Counters that other parts keep as running totals (dropped frames, underruns) are given as
totals (:meth:`Metrics.capture_dropped`, :meth:`Metrics.underruns`): the counter follows them
and never goes down. Values that are read rather than told (those totals, records waiting,
devices) can be read at each scrape: :meth:`Metrics.sample_with` runs a function on the trio
thread (``trio.from_thread``) before the registry is collected. prometheus-client's metrics are
thread-safe, so a scrape (its thread) may come at any moment.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_wsgi_server,
)

from r2d2voice.errors import ConfigError
from r2d2voice.protocol.actions import StoreLatency, StoreMessage, StoreResponse
from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult

__all__ = ["LATENCY_BUCKETS", "Metrics", "parse_address", "serve_metrics"]

log = logging.getLogger("r2d2voice.system.metrics")

#: Reply latency buckets, seconds (end of the person's speech → first reply sample played).
LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0)
#: How long the way out waits for the server thread to stop.
SHUTDOWN_DEADLINE = 2.0
#: Tool calls remembered by id until their result comes (a bound, oldest forgotten).
_CALLS_KEPT = 256


class Metrics:
    """The metrics of one run, in a registry of their own (``registry``)."""

    def __init__(self, *, process: bool = True) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._sampler = _Sampler()
        r.register(self._sampler)  # first: the registry collects in the order registered
        if process:  # process_* (CPU, memory, fds) and python_info, as a default registry has
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        p = "r2d2voice_"
        self._turns = Counter(p + "turns", "Turns the person took (transcribed utterances).",
                              registry=r)
        self._responses = Counter(p + "responses", "Replies by final status.", ["status"],
                                  registry=r)
        self._latency = Histogram(
            p + "reply_latency_seconds",
            "End of the person's speech to the first reply sample played.",
            buckets=LATENCY_BUCKETS, registry=r)
        self._cost = Counter(p + "cost_usd", "Estimated spend (the estimate `usage` shows).",
                             registry=r)
        self._remaining = Gauge(p + "budget_remaining_usd",
                                "USD before the nearest budget cap (+Inf: no cap).", registry=r)
        self._remaining.set(math.inf)
        self._connected = Gauge(p + "connected", "1 while a service session is open.",
                                registry=r)
        self._reconnects = Counter(p + "reconnects", "Sessions that replaced a lost one.",
                                   ["reason"], registry=r)
        self._store_waiting = Gauge(p + "store_records_waiting",
                                    "Records waiting for the database (full disk, I/O error).",
                                    registry=r)
        self._dropped = Counter(p + "capture_dropped_frames",
                                "Microphone frames dropped (uplink queue full).", registry=r)
        self._underruns = Counter(p + "playback_underruns",
                                  "Replies that ran out of audio mid-way.", registry=r)
        self._wakes = Counter(p + "wakes", "Wakes by source (word, external).", ["source"],
                              registry=r)
        self._tools = Counter(p + "tool_calls", "Tool calls by tool and final status.",
                              ["name", "status"], registry=r)
        self._devices = Gauge(p + "device_present", "1 while the sound device is there.",
                              ["kind"], registry=r)
        self._totals: dict[str, float] = {}
        self._calls: dict[str, str] = {}
        self._lock = threading.Lock()

    def sample_with(self, sample: Callable[[], None], token: trio.lowlevel.TrioToken) -> None:
        """Run ``sample`` (which sets values with the methods below) in the trio run of
        ``token`` at every scrape, before anything is collected; once that run is over the
        last values stay."""
        self._sampler.sample = sample
        self._sampler.token = token

    # -- what a run calls ---------------------------------------------------------------

    def turn(self) -> None:
        self._turns.inc()

    def response(self, status: str) -> None:
        self._responses.labels(status).inc()

    def reply_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def cost(self, usd: float) -> None:
        if usd > 0:
            self._cost.inc(usd)

    def budget_remaining(self, usd: float | None) -> None:
        """USD left before the nearest cap; None: no cap (+Inf)."""
        self._remaining.set(math.inf if usd is None else usd)

    def connected(self, up: bool) -> None:
        self._connected.set(1 if up else 0)

    def reconnect(self, reason: str) -> None:
        self._reconnects.labels(reason).inc()

    def store_waiting(self, n: int) -> None:
        self._store_waiting.set(n)

    def capture_dropped(self, total: int) -> None:
        """The run's dropped microphone frames so far."""
        self._follow(self._dropped, "dropped", total)

    def underruns(self, total: int) -> None:
        """The run's playback underruns so far."""
        self._follow(self._underruns, "underruns", total)

    def wake(self, source: str) -> None:
        self._wakes.labels(source).inc()

    def tool_call(self, name: str, status: str) -> None:
        self._tools.labels(name, status).inc()

    def device_present(self, kind: str, present: bool) -> None:
        """``kind``: ``input`` (microphone) or ``output`` (speaker)."""
        self._devices.labels(kind).set(1 if present else 0)

    def observe(self, record: Any) -> None:
        """A record the link stores: turns, final responses, latencies and tool calls."""
        if isinstance(record, StoreMessage):
            if record.role == "user" and not record.partial:
                self.turn()
        elif isinstance(record, StoreResponse):
            if record.status != "in_progress":
                self.response(record.status)
        elif isinstance(record, StoreLatency):
            self.reply_latency(record.first_played_ms / 1000)
        elif isinstance(record, StoreToolCall):
            if len(self._calls) >= _CALLS_KEPT:
                self._calls.pop(next(iter(self._calls)))
            self._calls[record.call_id] = record.name
        elif isinstance(record, StoreToolResult):
            self.tool_call(self._calls.pop(record.call_id, "unknown"), record.status)

    def _follow(self, counter: Counter, key: str, total: float) -> None:
        with self._lock:
            delta = total - self._totals.get(key, 0)
            if delta > 0:
                self._totals[key] = total
                counter.inc(delta)


class _Sampler:
    """A collector of nothing that runs the run's sampling first (see ``sample_with``)."""

    def __init__(self) -> None:
        self.sample: Callable[[], None] | None = None
        self.token: trio.lowlevel.TrioToken | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        if self.sample is not None and self.token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: as they were
                trio.from_thread.run_sync(self.sample, trio_token=self.token)
        return []


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464``) as (host, port); the setting was checked on load."""
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]"), int(port)


def _why(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "no such host"
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


async def serve_metrics(address: str, metrics: Metrics, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``metrics`` at ``http://address/metrics`` until cancelled; ``task_status`` gets
    the URL once the address is bound. ConfigError (exit 3) when it cannot be bound."""
    host, port = parse_address(address)
    try:
        server, thread = await trio.to_thread.run_sync(start_wsgi_server, port, host,
                                                       metrics.registry)
    except OSError as exc:
        raise ConfigError(f"R2D2_METRICS={address}: cannot serve metrics there: "
                          f"{_why(exc)}") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/metrics"
    log.info("metrics: Prometheus text at %s", url)
    try:
        task_status.started(url)
        await trio.sleep_forever()
    finally:
        with trio.move_on_after(SHUTDOWN_DEADLINE) as scope:
            scope.shield = True
            # shutdown() returns once serve_forever's loop (0.5 s polls) has stopped
            await trio.to_thread.run_sync(server.shutdown, abandon_on_cancel=True)
        server.server_close()
        if scope.cancelled_caught:
            log.warning("metrics: the server thread did not stop within %.0f s",
                        SHUTDOWN_DEADLINE)
        else:
            await trio.to_thread.run_sync(thread.join, SHUTDOWN_DEADLINE,
                                          abandon_on_cancel=True)
