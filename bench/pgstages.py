"""The store's hot path alone, stage by stage, on SQLite and on PostgreSQL: where the
end-to-end time of `bench/e2e.py --database` goes, without the daemon, the HTTP or the fake.

    python3 bench/pgstages.py --database postgresql://user@host/db [--tasks 100000]
                              [--batch-size 10000] [--chunk-size 5000] [--sqlite]

As the daemon does it when the API ends batches at once: for each batch, read the pending
pages (`iter_pending`), claim them (`record_intent`), record the create (`mark_created`);
then for each batch, stage the fake's result lines on a write-back lane in chunks, apply
them in id ranges, finish the batch. Parsing the lines is done before and not timed.
Each stage's total wall time is printed; PostgreSQL runs in a schema of its own, dropped
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from batchd.config import DatabaseConfig
from batchd.domain import Outcome
from batchd.pipeline.outcomes import parse_result_line
from batchd.store import Store, open_store

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, ended_batch, fake_lines, machine, tasks


class Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] += time.perf_counter() - started

    def show(self, title: str) -> None:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {s:.2f}" for name, s in self.seconds.items())
        print(f"{title}: {total:.2f} s ({parts})")


async def run(database: DatabaseConfig, count: int, batch_size: int, chunk_size: int) -> None:
    stages = Stages()
    started = time.perf_counter()
    store = await open_store(database)
    try:
        await store.enqueue(tasks(count))
        stages.add("enqueue", started)
        lines = [
            [parse_result_line(line) for line in fake_lines(min(batch_size, count - first), first)]
            for first in range(0, count, batch_size)
        ]
        # As in the end-to-end run with a fake that ends batches at once: every batch is
        # created (all tasks `submitted`) before the first one's results are written.
        created = [
            await submit(store, stages, f"msgbatch_{number}", len(outcomes))
            for number, outcomes in enumerate(lines)
        ]
        for local, outcomes in zip(created, lines, strict=True):
            await write_back(store, stages, local, outcomes, chunk_size)
    finally:
        await store.close()
    where = "PostgreSQL" if database.url else "SQLite"
    stages.show(f"{where}, {count:,} tasks in batches of {batch_size:,}")


async def submit(store: Store, stages: Stages, api_id: str, size: int) -> int:
    started = time.perf_counter()
    ids: list[int] = []
    pending = store.iter_pending()
    async for task in pending:
        ids.append(task.id)
        if len(ids) == size:
            break
    await pending.aclose()  # type: ignore[attr-defined]
    stages.add("read", started)
    started = time.perf_counter()
    local = await store.record_intent(ids, 1)
    assert local is not None
    stages.add("claim", started)
    started = time.perf_counter()
    assert await store.mark_created(local, ended_batch(api_id))  # type: ignore[arg-type]
    stages.add("record", started)
    return local


async def write_back(
    store: Store, stages: Stages, local: int, outcomes: list[Outcome], chunk_size: int
) -> None:
    async with store.write_back_lane() as lane:
        started = time.perf_counter()
        await lane.clear_staging()
        for at in range(0, len(outcomes), chunk_size):
            await lane.stage_results(local, outcomes[at : at + chunk_size])
        stages.add("stage", started)
        started = time.perf_counter()
        after = 0
        while applied := await lane.apply_staged(local, 3, chunk_size, after):
            after = applied.last_task_id
        await lane.clear_staging()
        stages.add("apply", started)
    started = time.perf_counter()
    await store.finish_batch(local, "none", matched_lines=len(outcomes))
    stages.add("finish", started)


async def drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True, help="a PostgreSQL URL")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=5_000)
    parser.add_argument("--sqlite", action="store_true", help="also run on SQLite, first")
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    if args.sqlite:
        with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
            sqlite = DatabaseConfig(path=Path(tmp) / "batchd.db")
            asyncio.run(run(sqlite, args.tasks, args.batch_size, args.chunk_size))
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        postgres = DatabaseConfig(url=args.database, schema=schema)
        asyncio.run(run(postgres, args.tasks, args.batch_size, args.chunk_size))
    finally:
        asyncio.run(drop(args.database, schema))


if __name__ == "__main__":
    main()
