"""Which service a run talks to, decided from settings before anything starts: OpenAI's
Realtime API, Azure OpenAI, OpenAI's GPT-Live, any ``--url``, or the embedded local backend
(which speaks Realtime, or GPT-Live with ``R2D2_LOCAL_PROTOCOL=live``).

Azure OpenAI speaks the same GA protocol; only the address and the auth header differ:
``wss://NAME.openai.azure.com/openai/v1/realtime?model=DEPLOYMENT`` with ``api-key: KEY``
(the GA ``/openai/v1`` path needs no ``api-version``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import trio

from r2d2voice.errors import ConfigError
from r2d2voice.link.transport import Endpoint
from r2d2voice.system.config import Settings

__all__ = ["LIVE", "LOCAL_MODEL", "REALTIME", "Service", "azure_realtime_url", "open_endpoint",
           "plan_service"]

#: The model a local-backend session records: it has none (it understands no words).
LOCAL_MODEL = "local"
#: Hosts whose service needs ``OPENAI_API_KEY``; any other ``--url`` gets the key if one is set.
_OPENAI_HOSTS = ("openai.com",)
#: The wire protocols: the GA Realtime API's, and GPT-Live's (full duplex).
REALTIME, LIVE = "realtime", "live"
#: Where the embedded local backend serves each protocol.
_LOCAL_PATHS = {REALTIME: "/v1/realtime", LIVE: "/v1/live/sessions"}


@dataclass(frozen=True)
class Service:
    """Where a run connects: ``endpoint`` None means the embedded local backend."""

    backend: str  # "openai", "azure", "live" or "local", as sessions record it
    model: str  # as sessions record it: the model, the Azure deployment, or LOCAL_MODEL
    endpoint: Endpoint | None
    #: the wire protocol (:data:`REALTIME` or :data:`LIVE`): which core the link drives
    protocol: str = REALTIME
    #: the voice sessions record (None: ``REALTIME_VOICE``)
    voice: str | None = None


def plan_service(settings: Settings, url: str | None = None) -> Service:
    """The service for ``settings`` (``url`` overrides the configured address); a missing key
    or Azure setting is a ConfigError now, before a database or a device is opened."""
    if settings.backend == "local":
        protocol = settings.local_protocol
        model = "" if protocol == LIVE else LOCAL_MODEL  # Live: the model is in session.start
        endpoint = None if url is None else Endpoint(url, model, settings.api_key)
        return Service("local", LOCAL_MODEL, endpoint, protocol,
                       settings.live_voice if protocol == LIVE else None)
    if settings.backend == "azure":
        return Service("azure", settings.azure_deployment or "", azure_endpoint(settings, url))
    if settings.backend == "live":
        # the model goes in session.start, not the URL (the service is strict)
        target = url or settings.live_url
        return Service("live", settings.live_model, Endpoint(target, "", _key(settings, target)),
                       LIVE, settings.live_voice)
    target = url or settings.realtime_url
    return Service("openai", settings.model,
                   Endpoint(target, settings.model, _key(settings, target)))


def _key(settings: Settings, url: str) -> str | None:
    """``OPENAI_API_KEY``: required at OpenAI's own hosts, sent to any other if it is set."""
    host = urlsplit(url).hostname or ""
    if any(host == h or host.endswith("." + h) for h in _OPENAI_HOSTS):
        return settings.require_api_key()
    return settings.api_key


def azure_endpoint(settings: Settings, url: str | None = None) -> Endpoint:
    """The Azure OpenAI endpoint: AZURE_OPENAI_ENDPOINT (or ``url``), the deployment as the
    model, the key in an ``api-key`` header."""
    wanted = {"AZURE_OPENAI_ENDPOINT": url or settings.azure_endpoint,
              "AZURE_OPENAI_DEPLOYMENT": settings.azure_deployment,
              "AZURE_OPENAI_API_KEY": settings.azure_api_key}
    missing = [name for name, value in wanted.items() if not value]
    if missing:
        raise ConfigError(f"R2D2_BACKEND=azure needs {', '.join(missing)}: put them in .env "
                          "(see .env.example) or the environment")
    address = url or azure_realtime_url(settings.azure_endpoint or "")
    return Endpoint(address, settings.azure_deployment or "", settings.azure_api_key,
                    auth_header="api-key", key_setting="AZURE_OPENAI_API_KEY")


def azure_realtime_url(endpoint: str) -> str:
    """``https://NAME.openai.azure.com`` → ``wss://NAME.openai.azure.com/openai/v1/realtime``;
    a URL that already names ``/openai/v1`` or ``…/realtime`` keeps its path."""
    parts = urlsplit(endpoint)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/realtime"):
        if not path.endswith("/openai/v1"):
            path += "/openai/v1"
        path += "/realtime"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@asynccontextmanager
async def open_endpoint(service: Service) -> AsyncIterator[Endpoint]:
    """``service``'s endpoint; for the embedded local backend, serve it on an ephemeral
    loopback port for as long as the context lasts."""
    if service.endpoint is not None:
        yield service.endpoint
        return
    from r2d2voice.localbackend.server import BackendConfig, serve_local

    # embedded, the backend's own chatter is noise next to the transcripts
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("r2d2voice.localbackend").setLevel(logging.WARNING)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_local, "127.0.0.1", 0,
                                   BackendConfig(realtime_factor=10.0))
        yield Endpoint(f"ws://127.0.0.1:{port}{_LOCAL_PATHS[service.protocol]}",
                       "" if service.protocol == LIVE else LOCAL_MODEL, None)
        nursery.cancel_scope.cancel()
