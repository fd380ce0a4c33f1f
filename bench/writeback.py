"""Write-back alone: parse result lines and write them with Store.write_results, while a
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.config import ResultsConfig
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.results import result_lines
from batchd.fakeapi.state import FakeClock, FakeState, Timeline
from batchd.fakeapi.validation import parse_create_body
from batchd.outcomes import parse_result_line
from batchd.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, machine, tasks


def fake_lines(count: int, first: int) -> list[bytes]:
    """The fake's result lines for tasks first..first+count, in its shuffled order."""
    body = b'{"requests":[%s]}' % b",".join(
        b'{"custom_id":"%s","params":%s}' % (cid.encode(), params.encode())
        for cid, params in list(tasks(first + count))[first:]
    )
    state = FakeState(clock=FakeClock(), timeline=Timeline(processing_seconds=0.0), seed=1)
    batch = state.create(parse_create_body(bytearray(body), frozenset()), FaultConfig())
    return [line.rstrip(b"\n") for line in result_lines(batch, state.timeline)]


def api_batch(batch_id: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "ended",
        "request_counts": counts,
        "ended_at": now,
        "created_at": now,
        "expires_at": now,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"http://127.0.0.1/{batch_id}/results",
    }


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


async def bench(db: Path, count: int, batch_size: int, chunk_size: int) -> None:
    store = await Store.open(db)
    await store.enqueue(tasks(count))
    batches: list[tuple[int, list[bytes]]] = []
    ids = [row[0] for row in await store._read("SELECT id FROM tasks ORDER BY id")]
    for first in range(0, count, batch_size):
        local = await store.record_intent(ids[first : first + batch_size], 1)
        assert local is not None
        await store.mark_created(local, api_batch(f"msgbatch_{first}"))  # type: ignore[arg-type]
        batches.append((local, fake_lines(min(batch_size, count - first), first)))
    parse_s = write_s = finish_s = 0.0
    written = 0
    with UserInserts(db) as user:
        for local, lines in batches:
            started = time.perf_counter()
            outcomes = [parse_result_line(line) for line in lines]
            parse_s += time.perf_counter() - started
            started = time.perf_counter()
            for start in range(0, len(outcomes), chunk_size):
                report = await store.write_results(local, outcomes[start : start + chunk_size], 3)
                written += report.written
            write_s += time.perf_counter() - started
            started = time.perf_counter()
            await store.finish_batch(local, "missing")
            finish_s += time.perf_counter() - started
    await store.close()
    assert written == count, written
    waits = sorted(user.waits)
    print(f"parse_result_line: {count / parse_s:,.0f} lines/s ({parse_s:.2f} s)")
    print(
        f"write_results (chunk_size {chunk_size}): {count / write_s:,.0f} rows/s ({write_s:.2f} s)"
    )
    print(f"finish_batch: {finish_s:.3f} s")
    print(
        f"user INSERTs meanwhile: {len(waits)}, wait p50 {waits[len(waits) // 2] * 1000:.1f} ms,"
        f" p99 {waits[int(len(waits) * 0.99)] * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms,"
        f" failed {user.failures}"
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
        asyncio.run(bench(Path(tmp) / "batchd.db", args.tasks, args.batch_size, args.chunk_size))


if __name__ == "__main__":
    main()
