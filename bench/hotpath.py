"""The daemon's two per-task Python steps alone, no network, no database: CPU seconds.

    python3 bench/hotpath.py [--tasks 100000] [--batch-size 10000] [--repeat 3]

- `build_chunk` over the bench's tasks (~420-byte requests) into chunks of `--batch-size`
  (validating and splicing each request, the body written to its spooled file);
- `validate_task` alone over the same tasks;
- `parse_result_line` over the fake's own result lines for them (its renderer, shuffled).

Each is run `--repeat` times; the figures are CPU seconds of this process (min and max).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from batchd.domain import PendingTask
from batchd.pipeline.chunker import build_chunk, validate_task
from batchd.pipeline.outcomes import parse_result_line

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, fake_lines, machine, tasks


async def _feed(pending: list[PendingTask]) -> AsyncIterator[PendingTask]:
    for task in pending:
        yield task


async def _chunks(pending: list[PendingTask], batch_size: int) -> int:
    feed = _feed(pending)
    total = 0
    while chunk := await build_chunk(feed, max_requests=batch_size, max_bytes=256_000_000):
        total += len(chunk)
        chunk.body.close()
        if not chunk.full:
            break
    return total


def _cpu(step: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    return min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    pending = [
        PendingTask(n, custom_id, params, 0)
        for n, (custom_id, params) in enumerate(tasks(args.tasks), 1)
    ]
    lines = [
        line
        for first in range(0, args.tasks, args.batch_size)
        for line in fake_lines(min(args.batch_size, args.tasks - first), first)
    ]
    assert asyncio.run(_chunks(pending, args.batch_size)) == args.tasks
    steps: list[tuple[str, Callable[[], object]]] = [
        ("build_chunk", lambda: asyncio.run(_chunks(pending, args.batch_size))),
        ("validate_task", lambda: [validate_task(task) for task in pending]),
        # A chunk's worth at a time, as the collector holds them (not 100,000 at once).
        (
            "parse_result_line",
            lambda: [
                [parse_result_line(line) for line in lines[start : start + 5000]]
                for start in range(0, len(lines), 5000)
            ],
        ),
    ]
    for label, step in steps:
        low, high = _cpu(step, args.repeat)
        print(f"{label}: {args.tasks:,} in {low:.3f}-{high:.3f} s CPU ({args.repeat} runs)")


if __name__ == "__main__":
    main()
