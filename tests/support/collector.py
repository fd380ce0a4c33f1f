"""Collector test helpers: a results server on loopback, result lines, an ended batch whose
results it serves, one collector pass, and the answers written back."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from batchd.api import BatchesClient, RetryPolicy
from batchd.config import CollectorSettings, ResultsConfig
from batchd.pipeline.collector import Collector
from batchd.service.metrics import Registry
from batchd.store import Store
from tests.support.store import FakeClock, add_tasks, api_batch, claim, query

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ApiStub:
    """Results bodies, statuses and batch objects a test sets; every request is counted."""

    base_url: str = ""
    bodies: dict[str, bytes] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, api_id: str) -> str:
        return f"{self.base_url}/results/{api_id}"


@asynccontextmanager
async def serving(
    stub: ApiStub, results: Handler, retrieve: Handler | None = None
) -> AsyncIterator[None]:
    """Serve `results` (and `retrieve`) on loopback; `stub.base_url` points at them."""
    app = web.Application()
    app.router.add_get("/results/{name}", results)
    if retrieve is not None:
        app.router.add_get("/v1/messages/batches/{id}", retrieve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stub.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield
    finally:
        await runner.cleanup()


def line(custom_id: str, text: str | None = None) -> bytes:
    """A succeeded line whose answer names its own custom_id (unless told otherwise)."""
    message = {
        "model": "claude-x",
        "content": [{"type": "text", "text": text or f"answer for {custom_id}"}],
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    return orjson.dumps(
        {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}
    )


async def ended_batch(store: Store, db_path: Path, api: ApiStub, api_id: str, *ids: str) -> int:
    await add_tasks(store, *ids)
    local_id = await claim(store, *ids)
    assert await store.mark_created(local_id, api_batch(api_id, "ended"))
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE batches SET results_url = ? WHERE id = ?", (api.url(api_id), local_id))
    conn.close()
    return local_id


async def collect(
    store: Store, api: ApiStub, clock: FakeClock, registry: Registry | None = None, **config: int
) -> int:
    async with aiohttp.ClientSession() as session:
        client = BatchesClient(session, base_url=api.base_url, api_key="k", policy=RetryPolicy(0))
        settings = CollectorSettings(ResultsConfig(**config), max_attempts=3)
        collector = Collector(store, client, settings, clock=clock, registry=registry)
        return await collector.collect_all()


def answers(db_path: Path) -> dict[str, tuple[str, str | None]]:
    rows = query(db_path, "SELECT custom_id, status, result FROM tasks")
    return {cid: (status, _text(result)) for cid, status, result in rows}


def _text(result: str | None) -> str | None:
    message = orjson.loads(result).get("message") if result else None
    return message["content"][0]["text"] if message else None
