"""Client test helpers: the key and base URL of the client under test, recorded sleeps,
loopback apps, and a batch object as the API returns it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Serve = Callable[[web.Application], Awaitable[str]]


KEY = "sk-ant-api03-TEST-SECRET-0123456789"
BASE = "https://api.example.test"


class Sleeps(list[float]):
    """An injected `sleep` that records the waits instead of sleeping."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


BATCHES = f"{BASE}/v1/messages/batches"


def batch_json(batch_id: str = "msgbatch_01", status: str = "in_progress") -> dict[str, Any]:
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": 2,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": None,
        "created_at": "2025-01-29T14:25:40.141141+00:00",
        "expires_at": "2025-01-30T14:25:40.141141+00:00",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": None,
    }
