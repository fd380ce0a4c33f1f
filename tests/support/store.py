"""Store test helpers: a fixed clock, tasks enqueued and claimed, batches as the API
returns them, outcomes, and reading the database as a user would."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.api.wire import MessageBatch, ProcessingStatus
from batchd.domain import Outcome, Usage
from batchd.store import Store

PARAMS = '{"model": "claude-x", "max_tokens": 16, "messages": []}'
START = datetime(2026, 11, 24, 15, 40, 37, 123456, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read through a separate plain connection, as a user would."""
    with sqlite3.connect(path, timeout=5) as conn:
        rows = conn.execute(sql, params).fetchall()
    conn.close()
    return rows


def api_batch(
    api_id: str,
    status: ProcessingStatus = "in_progress",
    *,
    processing: int = 0,
    succeeded: int = 0,
) -> MessageBatch:
    ended = status == "ended"
    return {
        "id": api_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": processing,
            "succeeded": succeeded,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": "2026-11-24T16:00:00.250000+00:00" if ended else None,
        "created_at": "2026-11-24T15:40:38.500000+00:00",
        "expires_at": "2026-11-25T15:40:38.500000+00:00",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"https://api.example/v1/messages/batches/{api_id}/results"
        if ended
        else None,
    }


def outcome(
    custom_id: str,
    result_type: str = "succeeded",
    *,
    retryable: bool = False,
    error: str | None = None,
    usage: Usage | None = None,
) -> Outcome:
    return Outcome(
        custom_id=custom_id,
        result_type=result_type,
        result_json=f'{{"type": "{result_type}"}}',
        error=error,
        retryable=retryable,
        usage=usage,
        model="claude-x" if result_type == "succeeded" else None,
    )


def answer(custom_id: str, source: str, usage: Usage | None = None) -> Outcome:
    """A succeeded line whose JSON says which batch (which request) it answers."""
    return Outcome(
        custom_id=custom_id,
        result_type="succeeded",
        result_json=f'{{"type": "succeeded", "from": "{source}"}}',
        error=None,
        retryable=False,
        usage=usage,
        model="claude-x",
    )


async def add_tasks(store: Store, *custom_ids: str) -> None:
    report = await store.enqueue((custom_id, PARAMS) for custom_id in custom_ids)
    assert report.inserted == len(custom_ids)


async def pending_ids(store: Store, custom_ids: Sequence[str]) -> list[int]:
    wanted = set(custom_ids)
    return [t.id async for t in store.iter_pending() if t.custom_id in wanted]


async def claim(store: Store, *custom_ids: str) -> int:
    local_id = await store.record_intent(await pending_ids(store, custom_ids), 1000)
    assert local_id is not None
    return local_id


async def submitted_batch(store: Store, api_id: str, *custom_ids: str) -> int:
    """Tasks enqueued, claimed, and their batch created and ended on the API."""
    await add_tasks(store, *custom_ids)
    local_id = await claim(store, *custom_ids)
    assert await store.mark_created(local_id, api_batch(api_id, "ended"))
    return local_id
