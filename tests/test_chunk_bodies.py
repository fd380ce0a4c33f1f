"""A chunk's request body (a temporary file past a few MB) is closed on every path, also
when building it fails: a store error while reading pending tasks (a PostgreSQL restart),
a stop (cancellation), or marking the invalid rows it found fails. An unclosed body is a
leaked file, reported at garbage collection as a ResourceWarning in whatever runs then."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import IO, Any

import aiohttp
import pytest

from batchd.api import BatchesClient, RetryPolicy
from batchd.config import BatchingConfig
from batchd.domain import PendingTask
from batchd.fakeapi.server import FakeApiServer
from batchd.pipeline import chunker
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import Submitter
from batchd.store import Store, StoreError
from tests.support.params import request_params


@pytest.fixture
def spooled(monkeypatch: pytest.MonkeyPatch) -> list[IO[bytes]]:
    """Every spooled file opened during the test."""
    opened: list[IO[bytes]] = []
    original: Callable[..., Any] = tempfile.SpooledTemporaryFile

    def recording(*args: Any, **kwargs: Any) -> Any:
        opened.append(original(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", recording)
    return opened


@pytest.mark.parametrize(
    "failure", [StoreError("the database went away"), asyncio.CancelledError()]
)
async def test_a_failure_while_reading_pending_tasks_closes_the_body(
    spooled: list[IO[bytes]], failure: BaseException
) -> None:
    async def failing() -> AsyncIterator[PendingTask]:
        yield PendingTask(1, "t-1", request_params("first"), 0)
        raise failure

    with pytest.raises(type(failure)):
        await chunker.build_chunk(failing(), max_requests=10, max_bytes=1_000_000)
    assert len(spooled) == 1
    assert spooled[0].closed


async def test_a_failure_marking_invalid_rows_closes_the_body(
    store: Store,
    fake_api: FakeApiServer,
    spooled: list[IO[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await store.enqueue([("ok-1", request_params("fine")), ("bad id!", request_params("x"))])

    async def refused(invalid: list[tuple[int, str]], versions: list[str]) -> int:
        raise StoreError("database is read-only")

    monkeypatch.setattr(store, "mark_invalid", refused)
    async with aiohttp.ClientSession() as session:
        client = BatchesClient(
            session, base_url=fake_api.base_url, api_key="k", policy=RetryPolicy(max_retries=0)
        )
        config = BatchingConfig(linger_s=0.0)
        reconciler = Reconciler(store, client, config, clock=lambda: datetime.now(UTC))
        submitter = Submitter(
            store, client, config, reconciler=reconciler, monotonic=time.monotonic
        )
        with pytest.raises(StoreError, match="read-only"):
            await submitter.submit_once()
    assert spooled
    assert all(body.closed for body in spooled)
    assert fake_api.state.stats.creates_accepted == 0  # nothing was sent
