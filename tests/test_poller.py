"""The poller: every in-flight batch at once, a write only when something changed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest

from batchd.client import BatchesClient, BytesBody
from batchd.domain import BatchState
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.poller import Poller
from batchd.store import Store
from tests.conftest import request_params


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
        FakeApiServer(FakeApiConfig(processing_seconds=0.6, seed=4)) as fake,
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
        poller = Poller(
            store, client, max_concurrency=4, not_found_grace_s=5, clock=lambda: datetime.now(UTC)
        )
        first = await poller.poll_all()
        assert (first.polled, writes) == (1, [])  # still in progress: nothing to write
        await asyncio.sleep(0.8)
        second = await poller.poll_all()
        assert (second.ended, writes) == (1, ["ended"])
        [ended] = await store.batches_in(BatchState.ENDED)
        assert ended.local_id == local_id
        assert ended.results_url is not None
