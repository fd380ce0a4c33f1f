"""Write-back alone: parse result lines, stage and apply them as the collector does, while a
user's connection keeps inserting tasks (how long does its INSERT wait for the lock?).

    python3 bench/writeback.py [--tasks 100000] [--batch-size 100000] [--chunk-size N]

The lines are the fake API's own (same renderer), shuffled as the real API returns them.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from batchd.config import CollectorSettings, ResultsConfig
from batchd.domain import Outcome, TaskStatus
from batchd.pipeline.collector import Collector
from batchd.pipeline.outcomes import parse_result_line
from batchd.store import Store
from batchd.store.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, ended_batch, fake_lines, machine, tasks


class UserInserts:
    """A user's own connection inserting one task every few ms; records each wait."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self._stop = threading.Event()
        self.waits: list[float] = []
        self.failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UserInserts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self._db, timeout=5, isolation_level=None)
        n = 0
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                conn.execute(
                    "INSERT INTO tasks (custom_id, params) VALUES (?, '{}')", (f"user-{n}",)
                )
            except sqlite3.OperationalError:
                self.failures += 1
            self.waits.append(time.perf_counter() - started)
            n += 1
            time.sleep(0.005)
        conn.close()

    def summary(self) -> str:
        waits = sorted(self.waits)
        return (
            f"user INSERTs {len(waits)}, wait p99 {waits[int(len(waits) * 0.99)] * 1000:.0f} ms,"
            f" max {waits[-1] * 1000:.0f} ms, failed {self.failures}"
        )


async def write_back(store: Store, local: int, outcomes: list[Outcome], chunk_size: int) -> int:
    """The store's calls one after another: stage the batch chunk by chunk, then apply it in
    id ranges (the collector also overlaps staging with parsing, see `collect`)."""
    await store.clear_staging()
    for start in range(0, len(outcomes), chunk_size):
        await store.stage_results(local, outcomes[start : start + chunk_size])
    written = after = 0
    while applied := await store.apply_staged(local, 3, chunk_size, after):
        written, after = written + applied.report.written, applied.last_task_id
    await store.clear_staging()
    return written


class MemoryResults:
    """Stands in for BatchesClient.results: each batch's lines from memory, no network."""

    def __init__(self, lines: dict[str, list[bytes]]) -> None:
        self._lines = lines

    @asynccontextmanager
    async def results(self, url: str, **_: object) -> AsyncIterator[AsyncIterator[bytes]]:
        async def stream() -> AsyncIterator[bytes]:
            for line in self._lines[url]:
                yield line

        yield stream()


async def prepare(db: Path, count: int, batch_size: int) -> tuple[Store, dict[int, list[bytes]]]:
    store = await SqliteStore.open(db)
    await store.enqueue(tasks(count))
    batches: dict[int, list[bytes]] = {}
    ids = [row[0] for row in await store.database.read("SELECT id FROM tasks ORDER BY id")]
    for first in range(0, count, batch_size):
        local = await store.record_intent(ids[first : first + batch_size], 1)
        assert local is not None
        await store.mark_created(local, ended_batch(f"msgbatch_{first}"))  # type: ignore[arg-type]
        batches[local] = fake_lines(min(batch_size, count - first), first)
    return store, batches


async def serial(db: Path, count: int, batch_size: int, chunk_size: int) -> float:
    """parse_result_line alone, then the store's stage and apply calls alone."""
    store, batches = await prepare(db, count, batch_size)
    parse_s = write_s = 0.0
    written = 0
    with UserInserts(db) as user:
        for local, lines in batches.items():
            started = time.perf_counter()
            outcomes = [parse_result_line(line) for line in lines]
            parse_s += time.perf_counter() - started
            started = time.perf_counter()
            written += await write_back(store, local, outcomes, chunk_size)
            write_s += time.perf_counter() - started
            await store.finish_batch(local, "missing")
    await store.close()
    assert written == count, written
    print(f"parse_result_line: {count / parse_s:,.0f} lines/s ({parse_s:.2f} s)")
    print(f"stage + apply, serial (chunk_size {chunk_size}): {count / write_s:,.0f} rows/s", end="")
    print(f" ({write_s:.2f} s); {user.summary()}")
    return parse_s


async def collect(db: Path, count: int, batch_size: int, chunk_size: int, parse_s: float) -> None:
    """The real Collector over lines in memory: parse, stage (overlapped), apply, finish."""
    store, batches = await prepare(db, count, batch_size)
    by_url = {
        f"http://127.0.0.1/msgbatch_{n * batch_size}/results": lines
        for n, lines in enumerate(batches.values())
    }
    settings = CollectorSettings(ResultsConfig(chunk_size=chunk_size), max_attempts=3)
    collector = Collector(store, MemoryResults(by_url), settings, clock=lambda: datetime.now(UTC))  # type: ignore[arg-type]
    with UserInserts(db) as user:
        started = time.perf_counter()
        finished = await collector.collect_all()
        wall = time.perf_counter() - started
    done = await store.status_counts()
    await store.close()
    assert finished == len(batches), finished
    assert done[TaskStatus.SUCCEEDED] == count, done
    print(
        f"Collector (parse + stage + apply + finish): {wall:.2f} s, {count / wall:,.0f} lines/s;"
        f" {user.summary()}"
    )
    added = wall - parse_s
    print(
        f"  write-back beyond parsing ({wall:.2f} - {parse_s:.2f} s): {count / added:,.0f} rows/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=ResultsConfig().chunk_size)
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        sizes = (args.tasks, args.batch_size, args.chunk_size)
        parse_s = asyncio.run(serial(Path(tmp) / "serial.db", *sizes))
        asyncio.run(collect(Path(tmp) / "collector.db", *sizes, parse_s))


if __name__ == "__main__":
    main()
