"""The daemon's peak RSS at the API's limits: one batch of 100,000 requests whose body is
~256 MB, and the write-back of a 100,000-request batch of ordinary requests.

    python3 bench/memory.py [--tasks 100000] [--prompt-bytes 2420] [--only big|small]

Peak RSS is the kernel's high-water mark for the daemon process (wait4's ru_maxrss); the
per-phase peaks come from /proc/PID/status sampled every 20 ms, split at the daemon's
`batch_created` log event (before: building and sending the body; after: results).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
from pathlib import Path

from batchd.api.wire import MAX_BATCH_BYTES
from batchd.config import DatabaseConfig
from batchd.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    FakeApiProcess,
    peak_between,
    print_header,
    run_daemon,
    tasks,
    write_config,
)


async def ingest(db: Path, count: int, prompt_bytes: int) -> None:
    store = await open_store(DatabaseConfig(path=db))
    try:
        await store.enqueue(tasks(count, prompt_bytes))
    finally:
        await store.close()


def scenario(work: Path, name: str, count: int, prompt_bytes: int) -> None:
    db = work / f"{name}.db"
    asyncio.run(ingest(db, count, prompt_bytes))
    with FakeApiProcess("--processing-seconds", "0") as fake:
        config = write_config(work / f"{name}.toml", db, fake.base_url, max_requests=count)
        run = run_daemon(config)
    if run.exit_code != 0:
        raise SystemExit(f"daemon exited with {run.exit_code}")
    with sqlite3.connect(db) as conn:
        bodies = conn.execute("SELECT count(*), max(body_bytes) FROM batches").fetchone()
        done = conn.execute("SELECT count(*) FROM tasks WHERE status = 'succeeded'").fetchone()[0]
    conn.close()
    if done != count:
        raise SystemExit(f"{name}: only {done} of {count} tasks succeeded")
    [created] = run.times("batch_created")
    [started] = run.times("daemon_started")
    [written] = run.times("results_written")
    end = float("inf")
    print(
        f"{name}: {bodies[0]} batch of {count:,} requests, body {bodies[1] / 1e6:.1f} MB"
        f" (limit {MAX_BATCH_BYTES / 1e6:.0f} MB)"
    )
    print(f"  peak RSS {run.peak_rss_mb:.0f} MB (ru_maxrss); CPU {run.cpu_s:.1f} s")
    print(
        f"  sampled peak: building+sending {peak_between(run.rss_samples, 0, created):.0f} MB,"
        f" results {peak_between(run.rss_samples, created, end):.0f} MB"
    )
    print(
        f"  submit {created - started:.1f} s, results written"
        f" {written - created:.1f} s after the create"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument(
        "--prompt-bytes", type=int, default=2420, help="prompt size of the big batch's requests"
    )
    parser.add_argument("--only", choices=["big", "small"])
    args = parser.parse_args()
    print_header()
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        if args.only in (None, "big"):
            scenario(Path(tmp), "big", args.tasks, args.prompt_bytes)
        if args.only in (None, "small"):
            scenario(Path(tmp), "small", args.tasks, 300)


if __name__ == "__main__":
    main()
