"""Several daemons on one PostgreSQL database finish the same tasks (issue 13).

    python3 bench/two_daemons.py --database postgresql://user@host/db
                                 [--tasks 100000] [--batch-size 10000] [--daemons 2]

The tasks are inserted into a schema of their own (dropped afterwards); N `batchd run
--exit-when-idle` are started at once against the fake API (`--processing-seconds 0`, a
child process): one leads (submits), the others stand by; every one of them polls and
collects ended batches under the row lease. Printed: the wall time until the last exits,
each daemon's CPU, peak RSS and what it collected, and the proof that no task was done
twice: the API's own count of requests received (its list of batches) equals the
database's attempts, every task attempted once and succeeded, and the results written by
all daemons add up to the tasks, none ignored (a batch collected twice would write its
lines once and count the second pass as ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import asyncpg

from batchd.config import DatabaseConfig
from batchd.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    DaemonRun,
    FakeApiProcess,
    command_line,
    machine,
    run_daemon,
    tasks,
    write_config,
)

HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}


async def ingest(database: DatabaseConfig, count: int) -> float:
    started = time.monotonic()
    store = await open_store(database)
    try:
        report = await store.enqueue(tasks(count))
    finally:
        await store.close()
    assert report.inserted == count, report
    return time.monotonic() - started


async def api_requests_received(base_url: str) -> tuple[int, int]:
    """(batches, requests) the fake API was sent, from its own list of batches."""
    batches = requests = 0
    after: str | None = None
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        while True:
            params = {"limit": "100", **({"after_id": after} if after else {})}
            async with session.get(f"{base_url}/v1/messages/batches", params=params) as resp:
                page = await resp.json()
            for batch in page["data"]:
                batches += 1
                requests += sum(batch["request_counts"].values())
            if not page["has_more"]:
                return batches, requests
            after = page["last_id"]


async def database_figures(url: str, schema: str) -> dict[str, object]:
    conn = await asyncpg.connect(url, server_settings={"search_path": f'"{schema}"'})
    try:
        row = await conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), sum(attempts),"
            " min(attempts), max(attempts) FROM tasks"
        )
        collectors = await conn.fetch(
            "SELECT collector, count(*), sum(request_count) FROM batches"
            " WHERE state = 'completed' GROUP BY collector ORDER BY collector"
        )
        unsettled = await conn.fetchval(
            "SELECT count(*) FROM batches WHERE state NOT IN ('completed', 'rejected', 'lost')"
        )
    finally:
        await conn.close()
    assert row is not None
    return {
        "tasks": row[0],
        "succeeded": row[1],
        "attempts": int(row[2] or 0),
        "attempts_range": (row[3], row[4]),
        "collectors": [(r[0], r[1], int(r[2])) for r in collectors],
        "unsettled": unsettled,
    }


async def drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def instance(run: DaemonRun) -> str:
    return next(str(e["instance"]) for e in run.events if e["event"] == "daemon_started")


def collected(run: DaemonRun) -> tuple[int, int, int]:
    """(batches finished, results written, lines ignored) from the daemon's log."""
    done = [e for e in run.events if e["event"] == "results_written"]
    return len(done), sum(int(e["written"]) for e in done), sum(int(e["ignored"]) for e in done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True, help="a PostgreSQL URL (CREATE needed)")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000, help="[batching] max_requests")
    parser.add_argument("--daemons", type=int, default=2)
    args = parser.parse_args()
    print(command_line())
    print(machine())
    schema = f"bench_{secrets.token_hex(4)}"
    database = DatabaseConfig(url=args.database, schema=schema)
    try:
        ingest_s = asyncio.run(ingest(database, args.tasks))
        print(f"ingest {args.tasks:,} tasks: {ingest_s:.2f} s")
        with (
            tempfile.TemporaryDirectory() as work,
            FakeApiProcess("--processing-seconds", "0") as fake,
        ):
            config = write_config(
                Path(work) / "batchd.toml",
                Path(work) / "unused.db",
                fake.base_url,
                url=args.database,
                schema=schema,
                max_requests=args.batch_size,
            )
            started = time.monotonic()
            with ThreadPoolExecutor(args.daemons) as pool:
                runs = list(pool.map(lambda _: run_daemon(config), range(args.daemons)))
            wall_s = time.monotonic() - started
            sent_batches, sent_requests = asyncio.run(api_requests_received(fake.base_url))
        figures = asyncio.run(database_figures(args.database, schema))
    finally:
        asyncio.run(drop(args.database, schema))
    report(args, runs, wall_s, sent_batches, sent_requests, figures)


def report(
    args: argparse.Namespace,
    runs: list[DaemonRun],
    wall_s: float,
    sent_batches: int,
    sent_requests: int,
    figures: dict[str, object],
) -> None:
    print(f"{args.daemons} daemons, {args.tasks:,} tasks: {wall_s:.2f} s wall until the last exit")
    by_collector = {name: (n, requests) for name, n, requests in figures["collectors"]}  # type: ignore[attr-defined]
    written_total = ignored_total = 0
    for n, run in enumerate(runs):
        leader = any(e["event"] == "leadership_acquired" for e in run.events)
        batches, written, ignored = collected(run)
        written_total += written
        ignored_total += ignored
        rows = by_collector.get(instance(run), (0, 0))
        print(
            f"  daemon {n} ({'leader' if leader else 'standby'}): exit {run.exit_code},"
            f" {run.wall_s:.2f} s, CPU {run.cpu_s:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB;"
            f" collected {batches} batches ({rows[1]:,} requests), wrote {written:,}"
            f" results, ignored {ignored}"
        )
    print(
        f"API received {sent_requests:,} requests in {sent_batches} batches; database:"
        f" {figures['attempts']:,} attempts (per task {figures['attempts_range']}),"
        f" {figures['succeeded']:,} of {figures['tasks']:,} succeeded,"
        f" {figures['unsettled']} batches unsettled"
    )
    twice = (
        sent_requests != figures["attempts"]
        or figures["attempts_range"] != (1, 1)
        or figures["succeeded"] != args.tasks
        or written_total != args.tasks
        or ignored_total != 0
        or any(run.exit_code != 0 for run in runs)
    )
    print("no task done twice" if not twice else "FAILED: a task done twice, or not done")
    if twice:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
