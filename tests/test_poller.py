"""The poller: every in-flight batch at once, a write only when something changed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest

from batchd.api import BatchesClient, BytesBody
from batchd.config import PollingConfig
from batchd.domain import BatchState
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.pipeline.poller import Poller
from batchd.store import Store, StoreError
from tests.support.params import request_params

pytestmark = pytest.mark.both_stores


PROCESSING_S = 3600.0  # ended only by advancing the fake's clock


async def test_polls_write_only_when_a_batch_changed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.enqueue((f"p-{n}", request_params(f"poll {n}")) for n in range(3))
    pending = [task async for task in store.iter_pending()]
    body = (
        b'{"requests":['
        + b",".join(
            b'{"custom_id":"' + t.custom_id.encode() + b'","params":' + t.params.encode() + b"}"
            for t in pending
        )
        + b"]}"
    )
    async with (
        FakeApiServer(FakeApiConfig(processing_seconds=PROCESSING_S, seed=4)) as fake,
        aiohttp.ClientSession() as session,
    ):
        client = BatchesClient(session, base_url=fake.base_url, api_key="k")
        local_id = await store.record_intent([t.id for t in pending], len(body))
        assert local_id is not None
        assert await store.mark_created(local_id, await client.create(BytesBody(body)))
        writes: list[str] = []
        original = store.update_batch

        async def counting(local: int, batch: object) -> None:
            writes.append(str(batch["processing_status"]))  # type: ignore[index]
            await original(local, batch)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "update_batch", counting)
        # A poll interval shorter than the wait below: on PostgreSQL a batch polled is
        # skipped (by every daemon) until its interval passed (batches_due_for_poll).
        poller = Poller(
            store,
            client,
            PollingConfig(interval_s=0.5, max_concurrency=4, not_found_grace_s=5),
            clock=lambda: datetime.now(UTC),
        )
        first = await poller.poll_all()
        assert (first.polled, writes) == (1, [])  # still in progress: nothing to write
        # The batch ends when the fake's clock says so, not after however long the machine
        # took to get here (0.6 s of processing once ended it before the first poll).
        fake.clock.advance(PROCESSING_S)
        await asyncio.sleep(0.8)  # the poller's own interval (PostgreSQL), in real time
        second = await poller.poll_all()
        assert (second.ended, writes) == (1, ["ended"])
        [ended] = await store.batches_in(BatchState.ENDED)
        assert ended.local_id == local_id
        assert ended.results_url is not None


async def test_a_failed_poll_leaves_no_other_poll_running_behind_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.enqueue((f"q-{n}", request_params(f"poll {n}")) for n in range(2))
    pending = [task async for task in store.iter_pending()]
    locals_: list[int] = []
    for n, task in enumerate(pending):
        local_id = await store.record_intent([task.id], 100)
        assert local_id is not None
        batch = {
            "id": f"msgbatch_{n}",
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {
                "processing": 1,
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": None,
            "created_at": "2026-11-24T15:40:37Z",
            "expires_at": "2026-11-25T15:40:37Z",
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": None,
        }
        assert await store.mark_created(local_id, batch)  # type: ignore[arg-type]
        locals_.append(local_id)
    events: list[str] = []

    class Api:
        async def retrieve(self, batch_id: str) -> dict[str, object]:
            if batch_id == "msgbatch_1":
                await asyncio.sleep(0.3)  # a slow answer, still on its way
            return {
                **batch,
                "id": batch_id,
                "processing_status": "ended",
                "ended_at": "2026-11-24T16:00:00Z",
            }

    async def update(local: int, remote: object) -> None:
        if local == locals_[0]:
            raise StoreError("database is locked")
        events.append(f"update {local}")

    monkeypatch.setattr(store, "update_batch", update)
    poller = Poller(
        store,
        Api(),
        PollingConfig(max_concurrency=4, not_found_grace_s=5),
        clock=lambda: datetime.now(UTC),
    )  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await poller.poll_all()
    events.append("poll_all raised")
    await asyncio.sleep(0.4)
    assert events == [f"update {locals_[1]}", "poll_all raised"]
