"""A results download is not given up as stalled because the collector waited for the
database between reads: real SQLite file, real collector, a results server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from batchd.config import CollectorSettings, ResultsConfig
from batchd.pipeline.collector import Collector
from batchd.store import Store
from tests.support.collector import ApiStub, answers, ended_batch, line, serving
from tests.support.store import FakeClock, query

pytestmark = pytest.mark.fake_clock  # the store runs on `clock`, at START

STALL_S = 0.3
WRITER_BUSY_S = 0.5  # longer than the stall window


@pytest.fixture
async def busy_writer_api(store: Store) -> AsyncIterator[ApiStub]:
    """Sends a first line, takes the store's writer and its write-back lanes (as another
    loop's write waiting on a user's lock would) for WRITER_BUSY_S, then sends the rest of
    the body at once."""
    stub = ApiStub()
    loop = asyncio.get_running_loop()
    lanes = await store.lanes.opened()
    locks = [store.database.write_lock, *(lane.connection.lock for lane in lanes._queue)]  # type: ignore[attr-defined]

    async def results(request: web.Request) -> web.StreamResponse:
        body = stub.bodies[request.match_info["name"]]
        first, rest = body.split(b"\n", 1)
        response = web.StreamResponse()
        await response.prepare(request)
        for lock in locks:  # free here: taken at once, before the line is staged
            await lock.acquire()
            loop.call_later(WRITER_BUSY_S, lock.release)
        await response.write(first + b"\n")
        await asyncio.sleep(0.05)  # the rest arrives while the collector waits
        await response.write(rest)
        return response

    async with serving(stub, results):
        yield stub


async def test_a_collector_kept_waiting_for_the_writer_still_finishes_a_healthy_download(
    store: Store, db_path: Path, busy_writer_api: ApiStub, clock: FakeClock
) -> None:
    ids = ("a", "b", "c")
    await ended_batch(store, db_path, busy_writer_api, "1", *ids)
    busy_writer_api.bodies["1"] = b"".join(line(cid) + b"\n" for cid in ids)

    async with aiohttp.ClientSession() as session:
        client = BatchesClient(
            session,
            base_url=busy_writer_api.base_url,
            api_key="k",
            policy=RetryPolicy(0),
            results_stall=(STALL_S, 64 * 1024),
        )
        settings = CollectorSettings(ResultsConfig(chunk_size=1), max_attempts=3)
        collector = Collector(store, client, settings, clock=clock)
        with capture_logs() as logs:
            finished = await collector.collect_all()

    assert [e for e in logs if e["event"] == "results_download_failed"] == []
    assert finished == 1
    assert all(answers(db_path)[cid] == ("succeeded", f"answer for {cid}") for cid in ids)
    assert query(db_path, "SELECT state, download_attempts FROM batches") == [("completed", 0)]
