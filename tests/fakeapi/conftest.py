"""Fixtures for the fake API's own tests: the fake in-process on a free port, a client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from tests.support.fakeapi import HEADERS, Api, StartFake


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


@pytest.fixture
def api(http: aiohttp.ClientSession, fake: FakeApiServer) -> Api:
    return Api(http, fake)
