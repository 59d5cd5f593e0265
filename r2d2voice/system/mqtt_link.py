"""One connection to an MQTT broker: paho-mqtt's client driven by trio through paho's
external-loop API (``socket()``, ``loop_read()``, ``loop_write()``, ``loop_misc()`` and the
``on_socket_*`` callbacks), so no network thread runs and every callback comes on the run's
thread. Only ``connect()`` blocks (name lookup, TCP, the TLS handshake): it runs in a worker
thread, abandoned if the run stops meanwhile (paho's own connect timeout ends it).

A link lives for one connection: :meth:`Link.session` connects, waits for the CONNACK, calls
``on_up()``, and returns why the connection ended. Reconnecting (with backoff) is the caller's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import trio
from paho.mqtt import client as paho

log = logging.getLogger("r2d2voice.system.mqtt")

#: the broker has this long to answer CONNECT
CONNACK_TIMEOUT_S = 10.0
#: keepalive pings (paho sends them; it drops a broker that stops answering)
KEEPALIVE_S = 30
#: paho's keepalive and timeouts are checked this often
MISC_EVERY_S = 1.0
#: outgoing messages paho holds (QoS 1 in flight or not yet written); more are dropped
MAX_QUEUED = 256


class Link:
    """A paho client for one connection; ``on_message(topic, payload)`` on the run's thread."""

    def __init__(self, client: paho.Client, on_message: Callable[[str, bytes], None]) -> None:
        self.client = client
        self.client.max_queued_messages_set(MAX_QUEUED)
        self.on_message = on_message
        self.up = False
        self.was_up = False  # a CONNACK came (the backoff starts over)
        self.why = ""
        self._acked = trio.Event()
        self._lost = trio.Event()
        self._want_write = trio.Event()
        self._published: dict[int, trio.Event] = {}

    async def session(self, host: str, port: int, on_up: Callable[[], None]) -> str:
        """Connect, serve until the connection ends, and say why it ended. OSError (or an
        ssl.SSLError) when the broker cannot be reached at all."""
        client = self.client
        await trio.to_thread.run_sync(
            functools.partial(client.connect, host, port, keepalive=KEEPALIVE_S),
            abandon_on_cancel=True)
        sock = client.socket()
        if sock is None:
            return "closed while connecting"
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_register_write = lambda *_: self._want_write.set()
        client.on_socket_unregister_write = lambda *_: None
        client.on_socket_close = lambda _c, _u, s: trio.lowlevel.notify_closing(s)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, sock)
                nursery.start_soon(self._write, sock)
                nursery.start_soon(self._misc)
                if client.want_write():
                    self._want_write.set()
                with trio.move_on_after(CONNACK_TIMEOUT_S):
                    await self._acked.wait()
                if self.up:
                    on_up()
                    await self._lost.wait()
                elif not self.why:
                    self.why = "no answer to CONNECT"
                nursery.cancel_scope.cancel()
        finally:
            self.up = False
            left = client.socket()
            if left is not None:  # this client is done with: close what paho still holds
                trio.lowlevel.notify_closing(left)
                left.close()
            # paho closes its socket again when the client is collected, outside trio
            client.on_socket_close = None
        return self.why or "connection closed"

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False,
                qos: int = 1) -> trio.Event | None:
        """Queue a message; an Event set once the broker has it (QoS 1), or None when it was
        not taken (not connected, paho's queue full)."""
        if not self.up:
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        done = self._published.setdefault(info.mid, trio.Event())
        if info.is_published():
            done.set()
        return done

    def subscribe(self, *topics: str) -> None:
        if self.up and topics:
            self.client.subscribe([(topic, 1) for topic in topics])

    async def close(self, deadline_s: float) -> None:
        """A clean DISCONNECT (the broker sends no last will), within ``deadline_s``."""
        if not self.up:
            return
        with trio.move_on_after(deadline_s):
            self.client.disconnect()
            await self._lost.wait()

    # -- paho's callbacks (the run's thread: inside loop_read / loop_write / loop_misc) -------
    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _properties: Any) -> None:
        if reason.is_failure:
            self.why = f"the broker refused the connection: {reason}"
        else:
            self.up = self.was_up = True
        self._acked.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Any) -> None:
        self.up = False
        if not self.why:
            self.why = str(reason) if reason is not None else "connection lost"
        self._lost.set()
        self._acked.set()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.on_message(message.topic, bytes(message.payload))

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, _reason: Any,
                    _properties: Any) -> None:
        self._published.pop(mid, trio.Event()).set()

    # -- the loop ------------------------------------------------------------------------------
    def _ended(self, rc: int) -> bool:
        if rc == paho.MQTT_ERR_SUCCESS and self.client.socket() is not None:
            return False
        if not self.why:
            self.why = paho.error_string(rc) if rc else "connection lost"
        self._lost.set()
        self._acked.set()
        return True

    async def _read(self, sock: Any) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:  # paho closed it (a DISCONNECT written, an error)
                self._ended(paho.MQTT_ERR_CONN_LOST)
                return
            rc = self.client.loop_read()
            # TLS may hold whole records already decrypted: the socket is not readable for them
            while not rc and getattr(sock, "pending", lambda: 0)() > 0:
                rc = self.client.loop_read()
            if self._ended(rc):
                return

    async def _write(self, sock: Any) -> None:
        while True:
            await self._want_write.wait()
            self._want_write = trio.Event()
            while self.client.want_write():
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:
                    self._ended(paho.MQTT_ERR_CONN_LOST)
                    return
                if self._ended(self.client.loop_write()):
                    return

    async def _misc(self) -> None:
        while True:
            await trio.sleep(MISC_EVERY_S)
            if self._ended(self.client.loop_misc()):
                return
