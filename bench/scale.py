"""Cost as history grows: the same new work into a database with a long history, and a fresh one.

    python3 bench/scale.py [--history 2000000] [--new 20000] [--db PATH] [--rounds 2]
                           [--prune-rows 100000] [--skip-exports]
                           [--database postgresql://user:pw@host/db]

Builds once (plain SQL, no daemon) a database holding `--history` finished tasks (status
`succeeded`, results of ~1.2 KB, completed two days ago) and keeps it at `--db` between
runs (default /tmp/batchd-scale/history-N.db; a 2,000,000-row one is ~3.5 GB and takes
minutes to build). Each run then, on that database and on a fresh one, alternately:

- `--new` new tasks end to end (`batchd run --exit-when-idle` against `batchd fake-api
  --processing-seconds 0`, both child processes): wall and the daemon's CPU, and the
  ratios history / fresh;
- the status counts (`status_counts` of the store, what `/metrics`, `/healthz`, the idle check and
  the progress display read): the median of five calls;
- `batchd results -o FILE` (every row with a result): rows/s;
- `batchd prune --older-than 365d --no-vacuum` over `--prune-rows` finished tasks
  inserted (plain SQL) as completed 400 days ago, so the history itself stays: rows/s.

Before each run the history database loses what earlier runs added (tasks, batches and
links past the built history), so every run starts from the same rows.

With `--database URL` the same runs are made on PostgreSQL: the history is the schema
`batchd_scale_N` of that database (bench/pgscale.py builds it with generate_series, once,
and keeps it), each fresh database a schema of its own, dropped after its round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from batchd.config import DatabaseConfig
from batchd.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
import pgscale
from common import (
    MODEL,
    FakeApiProcess,
    batchd_command,
    command_line,
    machine,
    params_json,
    prompt,
    run_daemon,
    write_config,
)

_BATCH_ROWS = 10_000  # history tasks per (completed) batch row
_TASK_INSERT = (
    "INSERT INTO tasks (id, custom_id, params, status, batch_id, attempts, result, model,"
    " input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens,"
    " created_at, submitted_at, completed_at)"
    " VALUES (?, ?, ?, 'succeeded', ?, 1, ?, ?, ?, ?, 0, 0, ?, ?, ?)"
)


def result_json(n: int) -> str:
    """A succeeded result of ~1.2 KB, shaped like the API's (and the fake's)."""
    text = prompt(n, 900)
    return orjson.dumps(
        {
            "type": "succeeded",
            "message": {
                "id": f"msg_{n:024d}",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 90, "output_tokens": 200},
            },
        }
    ).decode()


def _history_rows(first: int, count: int, completed: datetime) -> Iterator[tuple[object, ...]]:
    stamp = completed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for n in range(first, first + count):
        yield (
            n,
            f"hist-{n:09d}",
            params_json(n),
            n // _BATCH_ROWS + 1,
            result_json(n),
            MODEL,
            90,
            200,
            stamp,
            stamp,
            stamp,
        )


def build(path: Path, history: int) -> float:
    """The history database, with the daemon's own schema, filled with plain SQL."""
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    asyncio.run(_migrate(path))
    completed = datetime.now(UTC) - timedelta(days=2)
    stamp = completed.isoformat()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # a build that stops midway is rebuilt anyway
    batches = (history + _BATCH_ROWS - 1) // _BATCH_ROWS
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO batches (id, api_batch_id, state, request_count, body_bytes, intent_at,"
        " submitted_at, processing_status, ended_at, completed_at)"
        " VALUES (?, ?, 'completed', ?, 0, ?, ?, 'ended', ?, ?)",
        [
            (b + 1, f"msgbatch_hist{b:08d}", min(_BATCH_ROWS, history - b * _BATCH_ROWS))
            + (stamp,) * 4
            for b in range(batches)
        ],
    )
    db.execute("COMMIT")
    for first in range(1, history + 1, 50_000):
        count = min(50_000, history + 1 - first)
        db.execute("BEGIN")
        db.executemany(_TASK_INSERT, _history_rows(first, count, completed))
        db.execute(
            "INSERT INTO batch_tasks (batch_id, task_id)"
            " SELECT batch_id, id FROM tasks WHERE id BETWEEN ? AND ?",
            (first, first + count - 1),
        )
        db.execute("COMMIT")
        print(f"  built {first + count - 1:,} of {history:,} rows", file=sys.stderr, end="\r")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    Path(f"{path}.done").write_text(f"{history}\n", encoding="ascii")
    return time.perf_counter() - started


async def _migrate(path: Path) -> None:
    store = await open_store(DatabaseConfig(path=path))
    await store.close()


def reset(path: Path, history: int) -> None:
    """Drop what earlier runs added past the built history."""
    batches = (history + _BATCH_ROWS - 1) // _BATCH_ROWS
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM batch_tasks WHERE batch_id > ?", (batches,))
    db.execute("DELETE FROM tasks WHERE id > ?", (history,))
    db.execute("DELETE FROM batches WHERE id > ?", (batches,))
    db.execute("DELETE FROM unmatched_results")
    db.execute("DELETE FROM missing_results")
    db.execute("COMMIT")
    db.close()


Target = Path | pgscale.PgTarget  # a SQLite file, or a PostgreSQL schema


def database_config(target: Target) -> DatabaseConfig:
    if isinstance(target, pgscale.PgTarget):
        return target.database()
    return DatabaseConfig(path=target)


async def enqueue_new(path: Target, count: int) -> None:
    store = await open_store(database_config(path))
    try:
        report = await store.enqueue((f"new-{n:07d}", params_json(n)) for n in range(count))
    finally:
        await store.close()
    assert report.inserted == count, report


def add_prunable(path: Target, count: int) -> None:
    """`count` finished tasks completed 400 days ago, past every other id."""
    if isinstance(path, pgscale.PgTarget):
        pgscale.add_tasks(path, count, "old-", old=True)
        return
    db = sqlite3.connect(path, isolation_level=None)
    first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM tasks").fetchone()[0]
    old = datetime.now(UTC) - timedelta(days=400)
    rows = (
        (n, f"old-{n:09d}", params, None, *rest)  # no batch: pruning them deletes no batch
        for n, _, params, _, *rest in _history_rows(first, count, old)
    )
    db.execute("BEGIN IMMEDIATE")
    db.executemany(_TASK_INSERT, rows)
    db.execute("COMMIT")
    db.close()


async def counts_ms(path: Target) -> float:
    store = await open_store(database_config(path))
    try:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            await store.status_counts()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await store.close()
    return statistics.median(times)


def cli(config: Path, *args: str) -> tuple[float, float]:
    """Run `batchd ARGS` as a child process: wall and CPU seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        batchd_command("--config", str(config), *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ANTHROPIC_API_KEY": "bench"},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"batchd {' '.join(args)} failed")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def result_rows(path: Target) -> int:
    if isinstance(path, pgscale.PgTarget):
        return pgscale.result_rows(path)
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM tasks WHERE result IS NOT NULL").fetchone()[0]
    db.close()
    return count


def measure(
    label: str, path: Target, work: Path, base_url: str, args: argparse.Namespace
) -> dict[str, float]:
    if isinstance(path, pgscale.PgTarget):
        config = write_config(
            work / f"{label}.toml",
            work / "unused.db",
            base_url,
            url=path.url,
            schema=path.schema,
            max_requests=10_000,
        )
    else:
        config = write_config(work / f"{label}.toml", path, base_url, max_requests=10_000)
    asyncio.run(enqueue_new(path, args.new))
    run = run_daemon(config)
    if run.exit_code != 0:
        raise SystemExit(f"{label}: daemon exited with {run.exit_code}")
    figures = {"wall": run.wall_s, "cpu": run.cpu_s, "rss": run.peak_rss_mb}
    figures["counts_ms"] = asyncio.run(counts_ms(path))
    if not args.skip_exports:
        rows = result_rows(path)
        out = work / f"{label}-results.jsonl"
        wall, cpu = cli(config, "results", "-o", str(out))
        out.unlink()
        figures |= {"results_rows": rows, "results_s": wall, "results_cpu": cpu}
        add_prunable(path, args.prune_rows)
        wall, cpu = cli(config, "prune", "--older-than", "365d", "--no-vacuum")
        figures |= {"prune_s": wall, "prune_cpu": cpu}
    print(
        f"  {label}: {args.new:,} new tasks {run.wall_s:.2f} s wall, CPU {run.cpu_s:.2f} s,"
        f" peak RSS {run.peak_rss_mb:.0f} MB; status counts {figures['counts_ms']:.1f} ms"
    )
    if not args.skip_exports:
        print(
            f"    results -o: {figures['results_rows']:,.0f} rows in {figures['results_s']:.2f} s"
            f" ({figures['results_rows'] / figures['results_s']:,.0f} rows/s,"
            f" CPU {figures['results_cpu']:.2f} s); prune: {args.prune_rows:,} rows in"
            f" {figures['prune_s']:.2f} s ({args.prune_rows / figures['prune_s']:,.0f} rows/s,"
            f" CPU {figures['prune_cpu']:.2f} s)"
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=2_000_000, help="finished tasks kept")
    parser.add_argument("--new", type=int, default=20_000, help="new tasks end to end")
    parser.add_argument("--db", type=Path, help="the history database (built if missing)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh/history pairs, interleaved")
    parser.add_argument("--prune-rows", type=int, default=100_000)
    parser.add_argument("--skip-exports", action="store_true", help="no results -o, no prune")
    parser.add_argument("--database", help="PostgreSQL instead: a URL (schemas of its own)")
    args = parser.parse_args()
    if args.database:
        postgres(args)
        return
    history_db = args.db or Path(f"/tmp/batchd-scale/history-{args.history}.db")
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    done = Path(f"{history_db}.done")
    if not done.exists() or done.read_text(encoding="ascii").strip() != str(args.history):
        print(f"building {history_db} with {args.history:,} finished tasks ...")
        print(f"  built in {build(history_db, args.history):.0f} s", " " * 20)
    size_mb = history_db.stat().st_size / 1e6
    print(f"history database: {history_db} ({size_mb:,.0f} MB, {args.history:,} finished tasks)")
    results: dict[str, list[dict[str, float]]] = {"fresh": [], "history": []}
    with tempfile.TemporaryDirectory(prefix="batchd-scale-") as tmp:
        work = Path(tmp)
        with FakeApiProcess("--processing-seconds", "0") as fake:
            for number in range(1, args.rounds + 1):
                print(f"round {number}:")
                fresh = work / f"fresh-{number}.db"
                asyncio.run(_migrate(fresh))
                results["fresh"].append(measure("fresh", fresh, work, fake.base_url, args))
                fresh.unlink()
                reset(history_db, args.history)
                results["history"].append(measure("history", history_db, work, fake.base_url, args))
                reset(history_db, args.history)
    report(results, args)


def postgres(args: argparse.Namespace) -> None:
    """The same runs on PostgreSQL: the kept history schema against fresh schemas."""
    history = pgscale.PgTarget(args.database, f"batchd_scale_{args.history}")
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    if pgscale.built(history) != args.history:
        print(f"building schema {history.schema} with {args.history:,} finished tasks ...")
        print(f"  built in {pgscale.build(history, args.history):.0f} s", " " * 20)
    print(f"history: schema {history.schema} ({pgscale.size_mb(history):,.0f} MB of tables)")
    results: dict[str, list[dict[str, float]]] = {"fresh": [], "history": []}
    with tempfile.TemporaryDirectory(prefix="batchd-scale-") as tmp:
        work = Path(tmp)
        with FakeApiProcess("--processing-seconds", "0") as fake:
            for number in range(1, args.rounds + 1):
                print(f"round {number}:")
                fresh = history.fresh(f"fresh{number}")
                pgscale.drop(fresh)
                pgscale.migrate(fresh)
                try:
                    results["fresh"].append(measure("fresh", fresh, work, fake.base_url, args))
                finally:
                    pgscale.drop(fresh)
                pgscale.reset(history, args.history)
                results["history"].append(measure("history", history, work, fake.base_url, args))
                pgscale.reset(history, args.history)
    report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def ratios(key: str) -> str:
        pairs = zip(results["history"], results["fresh"], strict=True)
        return ", ".join(f"{h[key] / f[key]:.2f}x" for h, f in pairs)

    print(f"history / fresh, per round ({args.history:,} finished rows against none):")
    print(f"  {args.new:,} new tasks: wall {ratios('wall')}; daemon CPU {ratios('cpu')}")
    print(f"  status counts: {ratios('counts_ms')}")
    if not args.skip_exports:
        print(f"  prune time ({args.prune_rows:,} rows each): {ratios('prune_s')}")
        for label, runs in results.items():
            rates = ", ".join(f"{run['results_rows'] / run['results_s']:,.0f}" for run in runs)
            pruned = ", ".join(f"{args.prune_rows / run['prune_s']:,.0f}" for run in runs)
            print(f"  {label}: results -o {rates} rows/s; prune {pruned} rows/s")


if __name__ == "__main__":
    main()
