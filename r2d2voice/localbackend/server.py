"""A Realtime-compatible local backend speaking OpenAI's GA Realtime protocol: the trio shell.

Offline stand-in for the service, and the peer of the test suite: an energy VAD
(:mod:`r2d2voice.audio.vad`) detects turns in the appended audio, and every reply is a burst
of R2-D2 beeps (:mod:`r2d2voice.audio.beeps`) with an honest transcript. No speech
understanding. The protocol lives in :class:`~r2d2voice.localbackend.session.LocalSession`
(sans-IO); this module only moves bytes and time.

Per connection, a nursery of three tasks: the reader (client messages -> session), the
replier (streams one reply at a time, each in its own cancel scope; the beeps are made in a
worker thread so a slow board's event loop never waits on numpy) and the sender (the only
writer to the websocket; it applies the after-N-responses faults).

Protocol summary (server VAD mode, what a turn looks like on the wire)::

    input_audio_buffer.speech_started   item_id = the user item to come
    input_audio_buffer.speech_stopped
    input_audio_buffer.committed
    conversation.item.added / conversation.item.done            (user, input_audio)
    conversation.item.input_audio_transcription.completed       (only if transcription is
                                                                 configured, as the service)
    response.created, response.output_item.added, conversation.item.added,
    response.content_part.added,
    (response.output_audio.delta, response.output_audio_transcript.delta) * n,
    response.output_audio.done, response.output_audio_transcript.done,
    response.content_part.done, response.output_item.done, conversation.item.done,
    response.done

A cancelled response (``speech_started`` with ``interrupt_response``, or ``response.cancel``)
closes what was opened — audio/transcript/part ``done`` with the partial transcript,
``output_item.done`` and ``conversation.item.done`` with status ``incomplete`` — then
``response.done`` with status ``cancelled`` and ``status_details.reason`` ``turn_detected`` or
``client_cancelled``. One response at a time per connection, as the service.

Not modelled: text-only output, tools, ``idle_timeout_ms``, noise reduction, non-PCM formats;
``semantic_vad`` is accepted and run as the energy VAD with the ``server_vad`` defaults.

The listener is ``trio.serve_tcp`` + ``trio_websocket.wrap_server_stream`` (rather than
``serve_websocket``) so the connection owns its TCP stream: ``Faults.abort_after_responses``
resets it without touching trio-websocket internals.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import socket
import struct
import time
import urllib.parse

import trio
import trio_websocket

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.faults import Faults, junk_frames, session_expired
from r2d2voice.localbackend.reply import Reply, Tick, synthesize
from r2d2voice.localbackend.session import CancelReply, LocalSession
from r2d2voice.localbackend.session_config import DEFAULT_MODEL
from r2d2voice.localbackend.wire import RATE, EventMaker, Json, random_id

__all__ = ["BackendConfig", "Faults", "LocalSession", "serve_local", "stream_reply"]

log = logging.getLogger("r2d2voice.localbackend.server")

MAX_MESSAGE_BYTES = 16 * 2**20
"""Largest client message accepted (an append of ~4 min of base64 audio)."""

HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 1.0
OUTGOING_BUFFER = 64
"""Server events queued for the sender. Policy: wait (producers block; nothing is dropped)."""

REPLY_BUFFER = 2
"""Replies queued for the replier (one finishing after a cancel + the next). Policy: wait."""

ABORT_DELAY_S = 0.2
"""Pause between the Nth ``response.done`` and the reset (``Faults.abort_after_responses``)."""

Outgoing = Json | str | bytes
"""What the sender writes: an event (JSON text), or a raw text/binary frame (fault injection)."""

Streaming = tuple[Reply, trio.CancelScope]
"""A reply and the scope that cancels its streaming (made by the reader, entered by the
replier)."""


async def _read_loop(
    ws: trio_websocket.WebSocketConnection,
    session: LocalSession,
    out: trio.MemorySendChannel[Outgoing],
    replies: trio.MemorySendChannel[Streaming],
) -> None:
    """Client messages -> session -> events (to the sender) and replies (to the replier)."""
    current: Streaming | None = None  # the latest reply: the only one a CancelReply can name
    warned_full = False
    async with out, replies:
        await out.send(session.created())
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            for action in session.receive(message):
                if isinstance(action, Reply):
                    current = (action, trio.CancelScope())
                    await replies.send(current)
                elif isinstance(action, CancelReply):
                    if current is not None and current[0] is action.reply:
                        current[1].cancel()
                else:
                    if action["type"] == "error":
                        log.info("client error: %s (%s)", action["error"]["message"],
                                 action["error"]["code"])
                    await out.send(action)
            if session.input.dropped_samples and not warned_full:
                warned_full = True
                log.warning("input audio buffer full (15 MiB): dropping the oldest audio")


async def _reply_loop(
    session: LocalSession,
    replies: trio.MemoryReceiveChannel[Streaming],
    out: trio.MemorySendChannel[Outgoing],
    config: BackendConfig,
) -> None:
    """Stream replies one at a time; a cancelled reply still gets its closing events."""
    async with replies, out:
        try:
            async for reply, scope in replies:
                await stream_reply(session, reply, out, config, scope)
        except trio.BrokenResourceError:
            pass  # the sender is gone (connection closed or fault)


async def stream_reply(
    session: LocalSession,
    reply: Reply,
    out: trio.MemorySendChannel[Outgoing],
    config: BackendConfig,
    scope: trio.CancelScope | None = None,
) -> None:
    """Send one reply to ``out``: the faults' junk and delay, the opening events, the audio
    paced at ``config.pace_s`` per chunk on trio's clock; cancelling ``scope`` stops it, and
    either way its closing events follow."""
    faults = config.faults
    with scope or trio.CancelScope():
        if faults.junk:
            for junk in junk_frames(session.event):
                await out.send(junk)
        if faults.reply_delay_s > 0:
            await trio.sleep(faults.reply_delay_s)
        for event in reply.opening():
            await out.send(event)
            reply.sent(event)
        beeps = await trio.to_thread.run_sync(
            synthesize, reply.seed, reply.seconds, abandon_on_cancel=True)
        start = trio.current_time()
        for step in reply.chunks(beeps, config.chunk_samples):
            if isinstance(step, Tick):
                await trio.sleep_until(start + step.index * config.pace_s)
            else:
                await out.send(step)
                reply.sent(step)
    session.finish_reply(reply)
    log.info("response %s %s after %.2f s of audio", reply.id,
             "cancelled" if reply.cancel_reason else "completed", reply.bytes_sent / 2 / RATE)
    for event in reply.closing():
        await out.send(event)


async def _abort(stream: trio.abc.Stream) -> None:
    """Reset the TCP connection: no close frame, no FIN (SO_LINGER 0 makes close send RST)."""
    if isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _send_loop(
    ws: trio_websocket.WebSocketConnection,
    stream: trio.abc.Stream,
    out: trio.MemoryReceiveChannel[Outgoing],
    faults: Faults,
) -> None:
    """The only writer to the websocket; applies the after-N-responses faults."""
    done = 0
    async with out:
        async for message in out:
            data = message if isinstance(message, (str, bytes)) else json.dumps(message)
            try:
                await ws.send_message(data)
            except trio_websocket.ConnectionClosed:
                return
            if not (isinstance(message, dict) and message.get("type") == "response.done"):
                continue
            done += 1
            fault = faults.after_response(done)
            if fault is None:
                continue
            log.info("fault: %s after %d responses", fault, done)
            if fault == "abort":
                # A reset discards whatever the peer's kernel has not handed to it yet; wait a
                # moment so the reply itself arrives and the blip hits between turns.
                await trio.sleep(ABORT_DELAY_S)
                await _abort(stream)
                return
            code, reason = faults.close_code, "local backend fault injection"
            if fault == "expire":
                code, reason = 1000, "session expired"
                try:
                    await ws.send_message(json.dumps(session_expired(EventMaker(random_id))))
                except trio_websocket.ConnectionClosed:
                    return
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose(code, reason)
            return


def _header(request: trio_websocket.WebSocketRequest, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value
    return None


def _auth_error(api_key: str, request: trio_websocket.WebSocketRequest) -> Json | None:
    """None if the handshake carries the right bearer token, else the 401 body."""
    got = _header(request, b"authorization")
    if got is None:
        return {"error": {
            "message": "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).",
            "type": "invalid_request_error", "param": None, "code": None,
        }}
    if hmac.compare_digest(got, b"Bearer " + api_key.encode()):
        return None
    return {"error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
    }}


async def _serve_request(
    request: trio_websocket.WebSocketRequest, stream: trio.abc.Stream, config: BackendConfig
) -> None:
    remote = request.remote
    if config.api_key is not None:
        body = _auth_error(config.api_key, request)
        if body is not None:
            log.info("rejected %s: %s", remote, body["error"]["message"])
            await request.reject(
                401, extra_headers=[(b"Content-Type", b"application/json")],
                body=json.dumps(body).encode(),
            )
            return
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
    model = (query.get("model") or [DEFAULT_MODEL])[0]
    ws = await request.accept()
    session = LocalSession(model, clock=time.time, reply_seconds=config.effective_reply_seconds,
                           observer=config.observer)
    log.info("session %s opened from %s (model %s)", session.id, remote, model)
    try:
        out_send, out_recv = trio.open_memory_channel[Outgoing](OUTGOING_BUFFER)
        reply_send, reply_recv = trio.open_memory_channel[Streaming](REPLY_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_loop, ws, stream, out_recv, config.faults)
            nursery.start_soon(_reply_loop, session, reply_recv, out_send.clone(), config)
            # BrokenResourceError: the sender is gone (connection closed or fault).
            with contextlib.suppress(trio.BrokenResourceError):
                await _read_loop(ws, session, out_send, reply_send)
            nursery.cancel_scope.cancel()
    finally:
        # -inf: we are being cancelled, i.e. the server is shutting down ("going away").
        code = 1001 if trio.current_effective_deadline() == -math.inf else 1000
        # Shutting down, trio-websocket's reader is cancelled too: the peer's close reply
        # cannot be read, so only send the close frame (tiny deadline) and drop the TCP.
        wait = CLOSE_TIMEOUT_S if code == 1000 else 0.05
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait):
            await ws.aclose(code)
        log.info("session %s closed", session.id)


async def _handle_stream(stream: trio.SocketStream, config: BackendConfig) -> None:
    """One TCP connection: websocket handshake, then the session."""
    try:
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, message_queue_size=4, max_message_size=MAX_MESSAGE_BYTES,
                    receive_buffer_size=64 * 1024,
                )
            if request is not None:
                await _serve_request(request, stream, config)
            nursery.cancel_scope.cancel()  # stop trio-websocket's reader task
    except Exception:
        log.exception("connection failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_local(
    host: str = "127.0.0.1",
    port: int = 8765,
    config: BackendConfig | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local backend until cancelled; ``task_status.started(bound_port)``.

    Any path is accepted (``/v1/realtime?model=...``; the model is echoed in the session).
    Each connection gets its own session. Cancelling the caller's scope closes every
    connection (close code 1001, at most :data:`CLOSE_TIMEOUT_S` each) and the listener.
    A port that cannot be bound raises :class:`OSError` before ``started``.
    """
    config = config or BackendConfig()

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_stream(stream, config)

    # Bind before the nursery opens: a port in use is a plain OSError for the caller.
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        bound = listeners[0].socket.getsockname()[1]
        log.info("local Realtime backend listening on ws://%s:%d", host, bound)
        task_status.started(bound)
