"""Fixtures for the fake API's own tests: the fake in-process on a free port, a client."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.api.wire import ANTHROPIC_VERSION, BATCHES_PATH
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer

HEADERS = {"x-api-key": "test-key", "anthropic-version": ANTHROPIC_VERSION}
MODEL = "claude-haiku-4-5-20251001"

StartFake = Callable[..., Awaitable[FakeApiServer]]


def params(text: str, **extra: Any) -> dict[str, Any]:
    """Messages API params whose last user message is `text`."""
    return {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def requests_body(count: int, prefix: str = "req") -> dict[str, Any]:
    return {
        "requests": [
            {"custom_id": f"{prefix}-{n}", "params": params(f"question {prefix} {n}")}
            for n in range(count)
        ]
    }


def jsonl(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in body.splitlines() if line]


@pytest.fixture
async def start_fake() -> AsyncIterator[StartFake]:
    """Start a fake with FakeApiConfig overrides; all are stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> FakeApiServer:
            settings: dict[str, Any] = {"port": 0, "processing_seconds": 1.0, "seed": 7}
            settings.update(overrides)
            server = FakeApiServer(FakeApiConfig(**settings))
            return await stack.enter_async_context(server)

        yield start


@pytest.fixture
async def fake(start_fake: StartFake) -> FakeApiServer:
    """The fake in-process on a free port: requests finish within 1 s of fake time."""
    return await start_fake()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client sending the headers the real API wants."""
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        yield session


class Api:
    """Small helpers for raw calls to one fake; each returns (status, JSON body)."""

    def __init__(self, http: aiohttp.ClientSession, server: FakeApiServer) -> None:
        self.http = http
        self.server = server
        self.url = server.base_url + BATCHES_PATH

    async def call(self, method: str, path: str = "", **kwargs: Any) -> tuple[int, Any]:
        if "json" in kwargs:  # orjson, and a stream: aiohttp warns on big bytes bodies
            kwargs["data"] = io.BytesIO(orjson.dumps(kwargs.pop("json")))
            kwargs["headers"] = {"content-type": "application/json"}
        async with self.http.request(method, self.url + path, **kwargs) as response:
            return response.status, orjson.loads(await response.read())

    async def create(self, body: Any) -> dict[str, Any]:
        status, batch = await self.call("POST", json=body)
        assert status == 200, batch
        assert isinstance(batch, dict)
        return batch

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        status, batch = await self.call("GET", f"/{batch_id}")
        assert status == 200, batch
        assert isinstance(batch, dict)
        return batch

    async def results(self, batch_id: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/{batch_id}/results") as response:
            assert response.status == 200, await response.text()
            assert response.headers["content-type"] == "application/x-jsonl"
            return jsonl(await response.read())


@pytest.fixture
def api(http: aiohttp.ClientSession, fake: FakeApiServer) -> Api:
    return Api(http, fake)
