"""Talking to the fake API in tests: raw calls and request bodies for its own tests, and a
server-side refusal rule the client cannot know about."""

from __future__ import annotations

import asyncio
import io
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.api.wire import ANTHROPIC_VERSION, BATCHES_PATH
from batchd.fakeapi import validation
from batchd.fakeapi.server import FakeApiServer

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


async def create_with_repeats(api: Api) -> None:
    """Two creates: req-0 to req-2, then req-0 and req-1 again beside a fresh one."""
    await api.create(requests_body(3))
    await api.create(
        {
            "requests": requests_body(2)["requests"]
            + [{"custom_id": "fresh", "params": {"model": "m"}}]
        }
    )


def refuse_in_fake(
    monkeypatch: pytest.MonkeyPatch, refused: set[str], message: Callable[[int], str]
) -> None:
    """Make the fake refuse any create holding one of `refused`, with `message(index)`.

    Our chunker already refuses every custom_id the real API would, so this emulates a
    server-side rule the client cannot know about.
    """
    refuse_in_fake_by(
        monkeypatch, lambda index, custom_id: message(index) if custom_id in refused else None
    )


def refuse_in_fake_by(
    monkeypatch: pytest.MonkeyPatch, refusal: Callable[[int, str], str | None]
) -> None:
    """Make the fake refuse any create holding a request for which `refusal(index,
    custom_id)` gives a message (that message); None lets the request through."""
    check_envelope = validation._check_envelope

    def stricter(index: int, item: object) -> tuple[str, dict[str, object]]:
        custom_id, params = check_envelope(index, item)
        if (message := refusal(index, custom_id)) is not None:
            raise validation.CreateRejected(message)
        return custom_id, params

    monkeypatch.setattr(validation, "_check_envelope", stricter)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    """`python -m batchd.fakeapi --port 0 ARGS`, with its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd.fakeapi",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def start_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await spawn(*args)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
    match = re.fullmatch(r"batchd fake-api listening on (http://127\.0\.0\.1:\d+)\n", line)
    assert match, line
    return process, match.group(1)


async def admin(
    http: aiohttp.ClientSession, server: FakeApiServer, path: str, body: Any = None
) -> tuple[int, Any]:
    method = "GET" if body is None else "POST"
    async with http.request(method, f"{server.base_url}/_fake/{path}", json=body) as response:
        return response.status, await response.json()
