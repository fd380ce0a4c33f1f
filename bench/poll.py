"""Polling at scale: one `Poller.poll_all()` cycle over 2,000 batches in flight at once.

    python3 bench/poll.py [--batches 2000] [--concurrency 8] [--cycles 3]

The fake API runs in a child process with long processing, so every batch stays
`in_progress`; the poller, the store and the HTTP client run here, in this process, so
the CPU time measured is batchd's own. A ticker task measures the event loop's worst stall.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from batchd.api import BatchesClient, BytesBody
from batchd.config import DatabaseConfig, PollingConfig
from batchd.pipeline.poller import Poller
from batchd.service.logs import configure_logging
from batchd.store import Store, open_store

sys.path.insert(0, str(Path(__file__).parent))
from common import FakeApiProcess, print_header, tasks

_TICK_S = 0.005


class LagMeter:
    """A task that sleeps `_TICK_S` over and over and records how late each wake-up is."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + _TICK_S
            await asyncio.sleep(_TICK_S)
            self.worst_s = max(self.worst_s, loop.time() - due)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.create_task(self._tick(), name="lag-meter")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def create_batches(store: Store, client: BatchesClient, count: int) -> None:
    """`count` one-request batches, created on the fake and recorded as in flight."""
    await store.enqueue(tasks(count))
    pending = [task async for task in store.iter_pending()]
    for task in pending:
        body = b'{"requests":[{"custom_id":"%s","params":%s}]}' % (
            task.custom_id.encode(),
            task.params.encode(),
        )
        local_id = await store.record_intent([task.id], len(body))
        assert local_id is not None
        batch = await client.create(BytesBody(body))
        assert await store.mark_created(local_id, batch)


async def bench(db: Path, base_url: str, count: int, concurrency: int, cycles: int) -> None:
    store = await open_store(DatabaseConfig(path=db))
    try:
        async with aiohttp.ClientSession() as session:
            client = BatchesClient(session, base_url=base_url, api_key="bench")
            started = time.perf_counter()
            await create_batches(store, client, count)
            print(f"created {count:,} batches in {time.perf_counter() - started:.1f} s")
            poller = Poller(
                store,
                client,
                PollingConfig(max_concurrency=concurrency),
                clock=lambda: datetime.now(UTC),
            )
            for cycle in range(1, cycles + 1):
                await poll_cycle(poller, cycle, concurrency)
    finally:
        await store.close()


async def poll_cycle(poller: Poller, cycle: int, concurrency: int) -> None:
    with LagMeter() as lag:
        wall, cpu = time.perf_counter(), time.process_time()
        report = await poller.poll_all()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert (report.failed, report.lost, report.ended) == (0, 0, 0), report
    print(
        f"cycle {cycle}: {report.polled:,} batches polled (max_concurrency {concurrency}) in"
        f" {wall:.2f} s wall, {cpu:.2f} s CPU; worst loop stall {lag.worst_s * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=PollingConfig().max_concurrency)
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    print_header()
    with (
        open(os.devnull, "w", encoding="utf-8") as devnull,
        tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp,
        FakeApiProcess("--processing-seconds", "86000") as fake,
    ):
        configure_logging("json", "info", stream=devnull)  # as the daemon logs, unseen
        asyncio.run(
            bench(
                Path(tmp) / "batchd.db", fake.base_url, args.batches, args.concurrency, args.cycles
            )
        )


if __name__ == "__main__":
    main()
