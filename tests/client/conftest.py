"""Client test fixtures: the aioresponses shim, an HTTP session, loopback servers."""

from __future__ import annotations

import inspect
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses

from batchd.api import BatchesClient
from tests.support.client import BASE, KEY, Serve, Sleeps


class _NoopStreamWriter(AbstractStreamWriter):
    """Stands in for the request writer a mocked response never had."""

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        return None

    async def write_eof(self, chunk: bytes = b"") -> None:
        return None

    async def drain(self) -> None:
        return None

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        return None

    def enable_chunking(self) -> None:
        return None

    async def write_headers(self, status_line: str, headers: Any) -> None:
        return None


def _stream_writer_is_required() -> bool:
    parameter = inspect.signature(aiohttp.ClientResponse.__init__).parameters.get("stream_writer")
    return (
        parameter is not None
        and parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and parameter.default is inspect.Parameter.empty
    )


@pytest.fixture(autouse=True)
def aioresponses_stream_writer_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioresponses 0.7.9 omits `stream_writer`, which aiohttp 3.14 requires (pitfalls.md).

    Self-gating: supplies a no-op writer only when aiohttp requires the argument and the
    caller left it out, so it is inert for real responses, older aiohttp and a fixed
    aioresponses.
    """
    if not _stream_writer_is_required():
        return
    original = aiohttp.ClientResponse.__init__

    def init(self: aiohttp.ClientResponse, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _NoopStreamWriter())
        original(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientResponse, "__init__", init)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on a free loopback port; returns its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


# The client under test with recorded sleeps, and aioresponses (test_client, test_shapes).


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as mock:
        yield mock


@pytest.fixture
def make_client(session: aiohttp.ClientSession, sleeps: Sleeps) -> Any:
    def make(base_url: str = BASE, **overrides: Any) -> BatchesClient:
        options: dict[str, Any] = {"sleep": sleeps, "rng": random.Random(0)}
        options.update(overrides)
        return BatchesClient(session, base_url=base_url, api_key=KEY, **options)

    return make
