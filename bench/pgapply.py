"""The own batch's apply statement alone on PostgreSQL, its guard in three forms, alternating
(the order rotated each round), each run in a transaction rolled back: what the guard's
parts cost per row without the rest of the write-back around them.

    python3 bench/pgapply.py --database postgresql://user@host/db [--rounds 30]

100,000 tasks claimed in 10 batches of 10,000 and created; every task's line staged once
in a TEMP staging table as the lane stages it; each run applies one batch's 10,000 lines in
ranges of 5,000 ids (as bench/pgstages.py). Variants: `no revision` (the guard before
review 8's finding 6), `shipped` (writeback._APPLY_STAGED), `no EXISTS` (the revision alone,
no membership probe). Runs in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from batchd.config import DatabaseConfig
from batchd.store import open_store
from batchd.store.postgres import writeback

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, ended_batch, machine, tasks

_EXISTS = (
    "    AND EXISTS (SELECT 1 FROM batch_tasks AS m"
    " WHERE m.batch_id = $1 AND m.task_id = tasks.id)\n"
)
_REVISION = " AND tasks.revision = s.revision"
_STAGE_ALL = """
INSERT INTO pg_temp.staging SELECT row_number() OVER (ORDER BY id), id, revision, batch_id,
    custom_id, 'succeeded', '{"type": "succeeded"}', NULL, false, 10, 2, 0, 0, 'claude-x'
FROM tasks"""


def variants() -> dict[str, str]:
    shipped = writeback._APPLY_STAGED
    assert _EXISTS in shipped, "the shipped guard changed: update this benchmark"
    assert _REVISION in shipped, "the shipped guard changed: update this benchmark"
    return {
        "no revision": shipped.replace(_REVISION, ""),
        "shipped": shipped,
        "no EXISTS": shipped.replace(_EXISTS, ""),
    }


async def created_batches(database: DatabaseConfig) -> list[tuple[int, int, int]]:
    """(local id, first task id, last task id) of 10 created batches of 10,000 tasks."""
    store = await open_store(database)
    batches = []
    try:
        await store.enqueue(tasks(100_000))
        for number in range(10):
            ids = []
            async for task in store.iter_pending():
                ids.append(task.id)
                if len(ids) == 10_000:
                    break
            local = await store.record_intent(ids, 1)
            assert local is not None
            assert await store.mark_created(local, ended_batch(f"msgbatch_{number}"))  # type: ignore[arg-type]
            batches.append((local, min(ids), max(ids)))
    finally:
        await store.close()
    return batches


async def run(url: str, rounds: int) -> None:
    schema = f"bench_{secrets.token_hex(4)}"
    batches = await created_batches(DatabaseConfig(url=url, schema=schema))
    conn = await asyncpg.connect(url, server_settings={"search_path": f'"{schema}"'})
    try:
        await writeback.create_staging(conn)
        await conn.execute(_STAGE_ALL)
        await conn.execute("ANALYZE pg_temp.staging")
        statements = variants()
        seconds: dict[str, list[float]] = {name: [] for name in statements}
        now = datetime.now(UTC)
        for number in range(rounds):
            names = list(statements)
            local, first, last = batches[number % len(batches)]
            for name in names[number % 3 :] + names[: number % 3]:
                transaction = conn.transaction()
                await transaction.start()
                started = time.perf_counter()
                written = 0
                for low in range(first, last + 1, 5000):
                    high = min(low + 4999, last)
                    written += len(await conn.fetch(statements[name], local, 3, now, low, high))
                seconds[name].append(time.perf_counter() - started)
                await transaction.rollback()
                assert written == 10_000, (name, written)
        for name, values in seconds.items():
            print(
                f"{name:12s} median {statistics.median(values) * 1000:6.1f} ms per 10,000 rows"
                f" (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f}, n={len(values)})"
            )
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True, help="a PostgreSQL URL")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    asyncio.run(run(args.database, args.rounds))


if __name__ == "__main__":
    main()
