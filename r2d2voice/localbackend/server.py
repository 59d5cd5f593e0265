"""A Realtime-compatible local backend speaking OpenAI's GA Realtime protocol: the trio shell
(and, at ``/v1/live/sessions``, GPT-Live: :mod:`.live_server`).

Offline stand-in for the service, and the peer of the test suite: an energy VAD
(:mod:`r2d2voice.audio.vad`) detects turns in the appended audio, and every reply is a burst
of R2-D2 beeps (:mod:`r2d2voice.audio.beeps`) with an honest transcript. No speech
understanding. The protocol lives in :class:`~r2d2voice.localbackend.session.LocalSession`
(sans-IO); this module only moves bytes and time.

Per connection, a nursery of tasks (:mod:`.connection`): the reader (client messages ->
session), the replier (streams one reply at a time, each in its own cancel scope; the beeps are
made in a worker thread so a slow board's event loop never waits on numpy), the sender (the
only writer of messages; it applies the after-N-responses faults), the idle watcher, and the
timers some faults need.

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

A function-call response (``--script``): ``response.created``, [a spoken preamble: the audio
message's events, closed], ``response.output_item.added`` + ``conversation.item.added``
(``function_call``, arguments ""), ``response.function_call_arguments.delta`` * n,
``response.function_call_arguments.done``, ``response.output_item.done``,
``conversation.item.done``, ``response.done``. A ``function_call_output`` item +
``response.create`` get a reply quoting the output.

Not modelled: text-only output, MCP tools, noise reduction, non-PCM formats; ``semantic_vad``
is accepted and run as the energy VAD with the ``server_vad`` defaults. The real service's
habits are switches (:mod:`.faults`).

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
import time
import urllib.parse

import trio
import trio_websocket

from r2d2voice.localbackend.config import BackendConfig
from r2d2voice.localbackend.connection import CLOSE_TIMEOUT_S, Connection
from r2d2voice.localbackend.fault_events import connect_error
from r2d2voice.localbackend.faults import CONNECT_CLOSE_CODES, Faults
from r2d2voice.localbackend.live_server import is_live, serve_live
from r2d2voice.localbackend.session import LocalSession
from r2d2voice.localbackend.session_config import DEFAULT_MODEL
from r2d2voice.localbackend.streaming import stream_reply
from r2d2voice.localbackend.wire import EventMaker, Json, random_id

__all__ = ["BackendConfig", "Faults", "LocalSession", "serve_connection", "serve_local",
           "stream_reply"]

log = logging.getLogger("r2d2voice.localbackend.server")

MAX_MESSAGE_BYTES = 16 * 2**20
"""Largest client message accepted (an append of ~4 min of base64 audio)."""

HANDSHAKE_TIMEOUT_S = 10.0


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


async def _refuse(ws: trio_websocket.WebSocketConnection, kind: str, model: str) -> None:
    """What the service does after accepting a connection it will not serve: an ``error``,
    then a close with the code for ``kind``."""
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        await ws.send_message(json.dumps(connect_error(EventMaker(random_id), kind, model)))
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(CONNECT_CLOSE_CODES[kind], kind)


async def _serve_request(
    request: trio_websocket.WebSocketRequest, stream: trio.abc.Stream, config: BackendConfig
) -> None:
    remote = request.remote
    faults = config.faults
    refusal = faults.connect_error
    if config.api_key is not None:
        body = _auth_error(config.api_key, request)
        if body is not None and refusal != "invalid_api_key":
            log.info("rejected %s: %s", remote, body["error"]["message"])
            await request.reject(
                401, extra_headers=[(b"Content-Type", b"application/json")],
                body=json.dumps(body).encode(),
            )
            return
        if body is None and refusal == "invalid_api_key":
            refusal = None  # the right key: only a wrong one is refused after the upgrade
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
    model = (query.get("model") or [DEFAULT_MODEL])[0]
    ws = await request.accept()
    if refusal is not None:
        log.info("refused %s after the upgrade: %s", remote, refusal)
        await _refuse(ws, refusal, model)
        return
    if is_live(request.path):  # GPT-Live (its model comes in session.start)
        served = serve_live(ws, stream, config)
    else:
        session = LocalSession(model, clock=time.time, faults=faults, script=config.script,
                               reply_seconds=config.effective_reply_seconds,
                               observer=config.observer)
        log.info("session %s opened from %s (model %s)", session.id, remote, model)
        served = Connection(ws, stream, session, config).run()
    try:
        await served
    finally:
        # -inf: we are being cancelled, i.e. the server is shutting down ("going away").
        code = 1001 if trio.current_effective_deadline() == -math.inf else 1000
        # Shutting down, trio-websocket's reader is cancelled too: the peer's close reply
        # cannot be read, so only send the close frame (tiny deadline) and drop the TCP.
        wait = CLOSE_TIMEOUT_S if code == 1000 else 0.05
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait):
            await ws.aclose(code)
        log.info("connection from %s closed", remote)


async def serve_connection(stream: trio.abc.Stream, config: BackendConfig) -> None:
    """Serve one connection on ``stream`` (TCP, or an in-memory stream in tests): the
    websocket handshake, then the session, until the connection ends."""
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

    ``/v1/live/sessions`` speaks GPT-Live (:mod:`.live_server`); any other path is accepted
    as Realtime (``/v1/realtime?model=...``); every Realtime session names its model
    ``local`` (:data:`~r2d2voice.localbackend.session_config.LOCAL_MODEL`), whatever was asked.
    Each connection gets its own session. Cancelling the caller's scope closes every
    connection (close code 1001, at most :data:`CLOSE_TIMEOUT_S` each) and the listener.
    A port that cannot be bound raises :class:`OSError` before ``started``.
    """
    config = config or BackendConfig()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_connection(stream, config)

    # Bind before the nursery opens: a port in use is a plain OSError for the caller.
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        bound = listeners[0].socket.getsockname()[1]
        log.info("local Realtime backend listening on ws://%s:%d", host, bound)
        task_status.started(bound)
