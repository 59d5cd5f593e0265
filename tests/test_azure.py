"""Azure OpenAI as a second provider: the GA realtime URL built from the resource endpoint and
the deployment, the key in an ``api-key`` header, its settings checked before anything starts;
end to end, a replay through a recording front of the local backend (real sockets, SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from support import SAMPLES, clean_env, cli

from r2d2voice.appliance.endpoints import azure_realtime_url, plan_service
from r2d2voice.errors import ConfigError
from r2d2voice.link.transport import Endpoint
from r2d2voice.localbackend.server import BackendConfig, serve_connection
from r2d2voice.system.config import Settings

KEY = "azure-key-0123456789abcdef"


@pytest.mark.parametrize(("endpoint", "url"), [
    ("https://r2.openai.azure.com", "wss://r2.openai.azure.com/openai/v1/realtime"),
    ("https://r2.openai.azure.com/", "wss://r2.openai.azure.com/openai/v1/realtime"),
    ("https://r2.openai.azure.com/openai/v1/", "wss://r2.openai.azure.com/openai/v1/realtime"),
    ("wss://proxy.example/openai/v1/realtime", "wss://proxy.example/openai/v1/realtime"),
    ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/openai/v1/realtime"),
])
def test_the_ga_realtime_url_comes_from_the_resource_endpoint(endpoint: str, url: str) -> None:
    assert azure_realtime_url(endpoint) == url


def test_azure_endpoint_sends_the_key_as_api_key_and_the_deployment_as_model() -> None:
    service = plan_service(Settings(backend="azure", azure_endpoint="https://r2.openai.azure.com",
                                    azure_deployment="my-realtime", azure_api_key=KEY))
    assert (service.backend, service.model) == ("azure", "my-realtime")
    endpoint = service.endpoint
    assert endpoint is not None
    assert endpoint.full_url == "wss://r2.openai.azure.com/openai/v1/realtime?model=my-realtime"
    assert endpoint.headers() == [("api-key", KEY)]
    assert KEY not in repr(endpoint) and KEY not in repr(service)
    # OpenAI keeps its Bearer header
    assert Endpoint("wss://api.openai.com/v1/realtime", "m", "sk-1").headers() == \
        [("Authorization", "Bearer sk-1")]


def test_missing_azure_settings_are_named_before_anything_starts() -> None:
    with pytest.raises(ConfigError) as err:
        plan_service(Settings(backend="azure", azure_endpoint="https://r2.openai.azure.com"))
    assert str(err.value).startswith(
        "R2D2_BACKEND=azure needs AZURE_OPENAI_DEPLOYMENT, AZURE_OPENAI_API_KEY: ")


class Recording(trio.abc.Stream):
    """A server-side stream that keeps the first bytes the client sent (its handshake)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if len(self.received) < 4096:
            self.received += data
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def replay_against_azure(tmp_path: Path, config: BackendConfig) -> tuple[object, bytes]:
    """``replay hello.wav`` with R2D2_BACKEND=azure pointed at the local backend behind a
    recorder; the CLI's result and the handshake request it sent."""
    handshakes: list[Recording] = []

    async def handler(stream: trio.SocketStream) -> None:
        recording = Recording(stream)
        handshakes.append(recording)
        await serve_connection(recording, config)

    env = clean_env(HOME=str(tmp_path), R2D2_BACKEND="azure", AZURE_OPENAI_API_KEY=KEY,
                    AZURE_OPENAI_DEPLOYMENT="my-realtime")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        env["AZURE_OPENAI_ENDPOINT"] = f"http://127.0.0.1:{port}"
        result = await cli("--log-level", "DEBUG", "replay", str(SAMPLES / "hello.wav"),
                           "--db", str(tmp_path / "c.db"), cwd=tmp_path, env=env)
        nursery.cancel_scope.cancel()
    return result, bytes(handshakes[0].received)


async def test_a_replay_talks_to_azure_with_the_api_key_header(tmp_path: Path) -> None:
    r, request = await replay_against_azure(tmp_path, BackendConfig(realtime_factor=20))
    assert r.returncode == 0, r.stderr.decode()
    assert "1 turn answered" in r.stdout.decode()
    head = request.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "GET /openai/v1/realtime?model=my-realtime HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    assert headers["api-key"] == KEY and "authorization" not in headers
    con = sqlite3.connect(tmp_path / "c.db")
    # asked for the deployment (above); recorded is what the service says it is: this
    # stand-in says "local" (a real Azure names its model), so it is never billed
    assert con.execute("SELECT backend, model FROM sessions").fetchall() == \
        [("local", "local")]
    con.close()
    # the key is nowhere but in that header: not in the (debug) log, output or database
    for blob in (r.stdout, r.stderr, *(p.read_bytes() for p in tmp_path.rglob("*.db*"))):
        assert KEY.encode() not in blob


async def test_a_key_azure_rejects_is_exit_3_naming_the_azure_key(tmp_path: Path) -> None:
    # the local backend wants a Bearer token: to it the api-key header is no key at all (401)
    r, _ = await replay_against_azure(tmp_path, BackendConfig(api_key="another-key"))
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert err.strip().splitlines()[-1].endswith(
        "rejected the API key (HTTP 401): check AZURE_OPENAI_API_KEY")
    assert KEY not in err
