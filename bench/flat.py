"""Flat costs (issue 16): reads that must not grow with history, and a deep queue.

    python3 bench/flat.py reads --db PATH [--pending 1000000]
    python3 bench/flat.py reads --database postgresql://... [--history 2000000] [--pending N]
    python3 bench/flat.py deep [--tasks 100000 1000000] [--batch-size 10000]
    python3 bench/flat.py triggers [--tasks 100000] [--rounds 3]
    python3 bench/flat.py prune (--db PATH | --database URL) [--rows 100000] [--rounds 3] [--cli]

`reads` works on a COPY of a database holding a long history (bench/scale.py builds one;
this script adds rows to it and removes them again, and a newer batchd migrates it). It
times, median of several calls: `Store.status_counts`, `has_tasks` (where the store has
it), GET /metrics and /healthz of an idle `batchd run` with [metrics] on; then adds
`--pending` pending tasks (plain SQL) and times `batchd results -o FILE` (rows/s, every
status), cancelling one pending task, and `batchd prune` of 100,000 old finished tasks
with and without --export (rows/s, peak RSS). The timer reads of the status views are
timed too: `completed_since` (the last minute) and `batch_completions_since` (the last
hour). With `--database URL` the same on PostgreSQL, on the history schema bench/scale.py
keeps (`batchd_scale_N`, built if missing); EXPLAIN ANALYZE of the cancel is printed.

`deep` runs each `--tasks` count of pending tasks end to end (`batchd run --exit-when-idle`
against `batchd fake-api --processing-seconds 0`, both child processes, a fresh database
each) and prints wall, the daemon's CPU, the median gap between batch creates, and the
ratios to the first count.

`prune` times batchd's prune in this process (no CLI start-up), on a COPY as `reads`:
`--rows` old finished tasks added, then reading their ids alone, and `prune` itself
(`batchd.cli.prune.prune`, --no-vacuum) without and with an export, alternately: rows/s.
With `--cli`, `batchd prune --older-than 365d --no-vacuum [--export FILE]` itself as a
child process instead (start-up included, as the issue's rate is judged): wall, rows/s,
CPU and peak RSS. Every added row must be gone after each prune.

`triggers` measures what the task_counts triggers (migration 007) cost: CPU seconds of
inserting `--tasks` tasks, then claiming them (pending -> submitted) and finishing them
(submitted -> succeeded) in transactions of 5,000 with plain sqlite3, with and without
the triggers, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from batchd.cli.prune import prune
from batchd.config import DatabaseConfig
from batchd.domain import TaskStatus
from batchd.store import open_store
from batchd.store.sqlite.migrations import shipped_migrations

sys.path.insert(0, str(Path(__file__).parent))
import pgscale
from common import (
    FakeApiProcess,
    batchd_command,
    command_line,
    machine,
    params_json,
    run_daemon,
    write_config,
)

_PREFIX = "flat-"  # every row this script adds, removed again at the end of `reads`
_OLD_RESULT = orjson.dumps({"type": "succeeded", "message": {"text": "x" * 1100}}).decode()


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f} ms (min {min(samples) * 1000:.2f})"


Target = Path | pgscale.PgTarget


def database_config(db: Target) -> DatabaseConfig:
    return db.database() if isinstance(db, pgscale.PgTarget) else DatabaseConfig(path=db)


def config_file(path: Path, db: Target, base_url: str) -> Path:
    if isinstance(db, pgscale.PgTarget):
        return write_config(path, path.with_suffix(".db"), base_url, url=db.url, schema=db.schema)
    return write_config(path, db, base_url)


async def store_reads(db: Target, pending: int) -> None:
    store = await open_store(database_config(db))
    try:
        now = datetime.now(UTC)
        for label, read in (
            ("completed_since (1 min)", lambda: store.completed_since(now - timedelta(minutes=1))),
            (
                "batch_completions_since (1 h)",
                lambda: store.batch_completions_since(now - timedelta(hours=1)),
            ),
        ):
            times = []
            for _ in range(7):
                started = time.perf_counter()
                await read()
                times.append(time.perf_counter() - started)
            print(f"  {label}: {median_ms(times)}")
        for name in ("status_counts", "has_tasks"):
            if not hasattr(store, name):
                print(f"  {name}: not in this batchd")
                continue
            times = []
            for _ in range(7):
                started = time.perf_counter()
                if name == "status_counts":
                    await store.status_counts()
                else:
                    await store.has_tasks(TaskStatus.PENDING, TaskStatus.SUBMITTED)  # type: ignore[attr-defined]
                times.append(time.perf_counter() - started)
            print(f"  {name}: {median_ms(times)}")
        if pending:
            times = []
            for n in range(3):
                started = time.perf_counter()
                report = await store.request_cancel([f"{_PREFIX}{n * 7919 % pending:09d}"])
                times.append(time.perf_counter() - started)
                assert len(report.canceled) == 1, report
            print(f"  cancel one task of {pending:,} pending: {median_ms(times)}")
    finally:
        await store.close()


def endpoint_times(db: Target, tmp: Path) -> None:
    """GET /metrics and /healthz of an idle daemon (no fake needed: nothing to submit)."""
    config = config_file(tmp / "metrics.toml", db, "http://127.0.0.1:9")
    with config.open("a", encoding="utf-8") as extra:
        extra.write("[metrics]\nenabled = true\nport = 0\n")
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench"}
    args = batchd_command("--config", str(config), "run")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        port = None
        for raw in proc.stdout:
            event = orjson.loads(raw)
            if event.get("event") == "metrics_listening":
                port = event["port"]
                break
        assert port is not None, "the daemon never listened"
        drain = threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True)  # type: ignore[union-attr]
        drain.start()
        time.sleep(1.0)  # past the start: loops running, first status published
        for path in ("/metrics", "/healthz"):
            times, codes = [], set()
            for _ in range(9):
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                        r.read()
                        codes.add(r.status)
                except urllib.error.HTTPError as answer:  # /healthz: 503, the API is down
                    answer.read()
                    codes.add(answer.code)
                times.append(time.perf_counter() - started)
            print(f"  GET {path}: {median_ms(times)} (HTTP {sorted(codes)})")
    finally:
        proc.terminate()
        proc.wait(30)


def add_rows(db: Target, count: int, *, old: bool) -> None:
    """`count` pending tasks, or finished ones completed 400 days ago (prunable)."""
    if isinstance(db, pgscale.PgTarget):
        pgscale.add_tasks(db, count, f"{_PREFIX}old-" if old else _PREFIX, old=old)
        return
    conn = sqlite3.connect(db, isolation_level=None)
    first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM tasks").fetchone()[0]
    stamp = (datetime.now(UTC) - timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    conn.execute("BEGIN IMMEDIATE")
    if old:
        conn.executemany(
            "INSERT INTO tasks (id, custom_id, params, status, result, completed_at)"
            " VALUES (?, ?, ?, 'succeeded', ?, ?)",
            (
                (first + n, f"{_PREFIX}old-{n:09d}", params_json(n), _OLD_RESULT, stamp)
                for n in range(count)
            ),
        )
    else:
        conn.executemany(
            "INSERT INTO tasks (id, custom_id, params) VALUES (?, ?, ?)",
            ((first + n, f"{_PREFIX}{n:09d}", params_json(n)) for n in range(count)),
        )
    conn.execute("COMMIT")
    conn.close()


def remove_added(db: Target) -> None:
    if isinstance(db, pgscale.PgTarget):
        pgscale.remove_added(db, _PREFIX)
        return
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "DELETE FROM tasks WHERE custom_id >= ? AND custom_id < ?", (_PREFIX, _PREFIX[:-1] + ".")
    )
    conn.close()


def timed_command(*args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one batchd command run as a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(batchd_command(*args), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"batchd {' '.join(args)} failed")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def reads(db: Target, pending: int, *, results: bool) -> None:
    remove_added(db)
    with tempfile.TemporaryDirectory(prefix="batchd-flat-") as tmp:
        work = Path(tmp)
        config = config_file(work / "batchd.toml", db, "http://127.0.0.1:9")
        if isinstance(db, pgscale.PgTarget):
            total = pgscale.max_id(db)
            print(f"schema {db.schema} ({pgscale.size_mb(db) / 1e3:.1f} GB, ids up to {total:,})")
        else:
            total = sqlite3.connect(db).execute("SELECT max(id) FROM tasks").fetchone()[0]
            print(f"database: {db} ({db.stat().st_size / 1e9:.1f} GB, ids up to {total:,})")
        asyncio.run(store_reads(db, 0))  # also migrates the copy: not timed below
        endpoint_times(db, work)
        add_rows(db, pending, old=False)
        print(f"with {pending:,} pending tasks added:")
        asyncio.run(store_reads(db, pending))
        if isinstance(db, pgscale.PgTarget):
            plan = pgscale.explain(
                db,
                "UPDATE tasks SET status = 'canceled', error = 'bench', completed_at = now()"
                " WHERE id = ANY($1::bigint[]) AND status || '' = 'pending'",  # the store's
                [total + 2],  # pending still (the store_reads above cancelled +1)
            )
            print("  EXPLAIN ANALYZE of a cancel's UPDATE:", *plan, sep="\n    ")
        out = work / "results.jsonl"
        if results:  # --skip-results: an older batchd takes minutes here (issue 16: 407 s)
            wall, rss = timed_command("--config", str(config), "results", "-o", str(out))
            lines = sum(1 for _ in out.open("rb"))
            print(f"  batchd results -o: {lines:,} lines in {wall:.2f} s,"
                  f" {lines / wall:,.0f} rows/s, peak RSS {rss:.0f} MB")  # fmt: skip
            out.unlink()
        for export in (False, True):
            add_rows(db, 100_000, old=True)
            extra = ["--export", str(work / "pruned.jsonl")] if export else []
            args = ["--config", str(config), "prune", "--older-than", "365d", "--no-vacuum"]
            wall, rss = timed_command(*args, *extra)
            label = "with --export" if export else "no export"
            print(f"  batchd prune ({label}) of 100,000 old tasks: {wall:.2f} s,"
                  f" {100_000 / wall:,.0f} rows/s, peak RSS {rss:.0f} MB")  # fmt: skip
    remove_added(db)


async def _timed_prune(db: Target, rows: int, export: Path | None) -> tuple[float, float]:
    """Seconds to read the prunable ids alone, and to prune them (in this process)."""
    cutoff = datetime.now(UTC) - timedelta(days=365)
    store = await open_store(database_config(db))
    try:
        started = time.perf_counter()
        found = [i async for page in store.accounts.iter_prunable_ids(cutoff) for i in page]
        read_s = time.perf_counter() - started
        assert len(found) == rows, (len(found), rows)
        started = time.perf_counter()
        if export is None:
            report = await prune(store, cutoff, vacuum=False)
        else:
            with export.open("xb") as out:
                report = await prune(store, cutoff, export=out, vacuum=False)
        assert report.deleted == rows, report
        return read_s, time.perf_counter() - started
    finally:
        await store.close()


def cli_prune(config: Path, export: Path | None) -> tuple[float, float, float]:
    """`batchd prune --older-than 365d --no-vacuum [--export FILE]` as a child process, as
    users run it (process start, imports and the schema check included): wall seconds,
    CPU seconds (user + system) and peak RSS (MB)."""
    extra = ["--export", str(export)] if export is not None else []
    args = ["--config", str(config), "prune", "--older-than", "365d", "--no-vacuum", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(batchd_command(*args), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"batchd {' '.join(args)} failed")
    wall = time.perf_counter() - started
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def prune_parts(db: Target, rows: int, rounds: int, *, cli: bool) -> None:
    """In-process prune (ids read, then prune), or with `cli` the command itself, without
    and with an export, alternately, `rounds` times."""
    remove_added(db)
    with tempfile.TemporaryDirectory(prefix="batchd-prune-") as tmp:
        config = config_file(Path(tmp) / "batchd.toml", db, "http://127.0.0.1:9")
        for _ in range(rounds):
            for export in (None, Path(tmp) / "pruned.jsonl"):
                add_rows(db, rows, old=True)
                label = "with export" if export else "no export"
                if cli:
                    wall, cpu, rss = cli_prune(config, export)
                    lines = sum(1 for _ in export.open("rb")) if export else 0
                    print(f"  batchd prune {rows:,} ({label}): {wall:.2f} s,"
                          f" {rows / wall:,.0f} rows/s, CPU {cpu:.2f} s, peak RSS {rss:.0f} MB"
                          + (f", {lines:,} lines" if export else ""), flush=True)  # fmt: skip
                else:
                    read_s, prune_s = asyncio.run(_timed_prune(db, rows, export))
                    rate = rows / prune_s
                    print(f"  prune {rows:,} ({label}): ids read in {read_s:.2f} s;"
                          f" prune {prune_s:.2f} s, {rate:,.0f} rows/s", flush=True)  # fmt: skip
                if export is not None:
                    export.unlink()
                remaining = _added_left(db)
                assert remaining == 0, f"{remaining} added rows left after the prune"
    remove_added(db)


def _added_left(db: Target) -> int:
    if isinstance(db, pgscale.PgTarget):
        return int(pgscale.run(db, lambda conn: conn.fetchval(
            "SELECT count(*) FROM tasks WHERE custom_id LIKE $1", f"{_PREFIX}%")))  # fmt: skip
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM tasks WHERE custom_id >= ? AND custom_id < ?",
            (_PREFIX, _PREFIX[:-1] + "."),
        ).fetchone()[0])  # fmt: skip
    finally:
        conn.close()


def pending_db(path: Path, count: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO tasks (custom_id, params) VALUES (?, ?)",
        ((f"deep-{n:09d}", params_json(n)) for n in range(count)),
    )
    conn.execute("COMMIT")
    conn.close()


async def _migrate(path: Path) -> None:
    await (await open_store(DatabaseConfig(path=path))).close()


def deep(counts: list[int], batch_size: int) -> None:
    first: tuple[float, float] | None = None
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="batchd-deep-") as tmp:
            db = Path(tmp) / "batchd.db"
            asyncio.run(_migrate(db))
            pending_db(db, count)
            with FakeApiProcess("--processing-seconds", "0") as fake:
                config = write_config(
                    Path(tmp) / "batchd.toml", db, fake.base_url, max_requests=batch_size
                )
                run = run_daemon(config)
            if run.exit_code != 0:
                raise SystemExit(f"daemon exited with {run.exit_code}")
            left = sqlite3.connect(db).execute(
                "SELECT count(*) FROM tasks WHERE status <> 'succeeded'"
            )
            assert left.fetchone()[0] == 0
        [start] = run.times("daemon_started")
        wall = max(run.times("daemon_stopped")) - start
        creates = run.times("batch_created")
        gaps = [b - a for a, b in itertools.pairwise(creates)]
        gap = statistics.median(gaps) if gaps else 0.0
        line = (f"{count:>9,} pending: {wall:7.2f} s wall, CPU {run.cpu_s:7.2f} s,"
                f" median gap between creates {gap:.3f} s")  # fmt: skip
        if first is None:
            first = (wall, run.cpu_s)
        else:
            line += f"; x{wall / first[0]:.2f} wall, x{run.cpu_s / first[1]:.2f} CPU"
        print(line, flush=True)


def trigger_costs(count: int, rounds: int) -> None:
    scripts = shipped_migrations()
    steps = {
        "insert": "",  # executemany below
        "claim": "UPDATE tasks SET status = 'submitted', batch_id = NULL"
        " WHERE id BETWEEN ? AND ? AND status = 'pending'",
        "finish": "UPDATE tasks SET status = 'succeeded', result = '{}', completed_at = 'x'"
        " WHERE id BETWEEN ? AND ? AND status = 'submitted'",
    }
    found: dict[tuple[bool, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="batchd-triggers-") as tmp:
        for _ in range(rounds):
            for counted in (False, True):
                path = Path(tmp) / f"{counted}.db"
                path.unlink(missing_ok=True)
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode = WAL")
                for migration in scripts:
                    if counted or migration.name != "flat_costs":
                        conn.executescript(migration.script)
                for step, sql in steps.items():
                    started = time.process_time()
                    for first in range(1, count + 1, 5000):
                        last = min(first + 4999, count)
                        conn.execute("BEGIN IMMEDIATE")
                        if step == "insert":
                            conn.executemany(
                                "INSERT INTO tasks (id, custom_id, params) VALUES (?, ?, ?)",
                                ((n, f"c{n}", "x" * 400) for n in range(first, last + 1)),
                            )
                        else:
                            conn.execute(sql, (first, last))
                        conn.execute("COMMIT")
                    found.setdefault((counted, step), []).append(time.process_time() - started)
                conn.close()
    for step in steps:
        without, with_ = (statistics.median(found[(c, step)]) for c in (False, True))
        print(f"  {step} {count:,}: {without:.3f} s CPU without, {with_:.3f} s with the"
              f" triggers (+{(with_ - without) / count * 1e6:.2f} us a row)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    on_db = sub.add_parser("reads")
    on_db.add_argument("--db", type=Path, help="a copy: rows are added to it")
    on_db.add_argument("--database", help="PostgreSQL instead: a URL (the scale.py schema)")
    on_db.add_argument("--history", type=int, default=2_000_000, help="with --database")
    on_db.add_argument("--pending", type=int, default=1_000_000)
    on_db.add_argument("--skip-results", action="store_true", help="no `batchd results -o`")
    queue = sub.add_parser("deep")
    queue.add_argument("--tasks", type=int, nargs="+", default=[100_000, 1_000_000])
    queue.add_argument("--batch-size", type=int, default=10_000)
    parts = sub.add_parser("prune")
    parts.add_argument("--db", type=Path, help="a copy: rows are added to it")
    parts.add_argument("--database", help="PostgreSQL instead: a URL (the scale.py schema)")
    parts.add_argument("--history", type=int, default=2_000_000, help="with --database")
    parts.add_argument("--rows", type=int, default=100_000)
    parts.add_argument("--rounds", type=int, default=3)
    parts.add_argument("--cli", action="store_true", help="time `batchd prune` itself")
    costs = sub.add_parser("triggers")
    costs.add_argument("--tasks", type=int, default=100_000)
    costs.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    if args.what in ("reads", "prune"):
        db: Target
        if args.database:
            db = pgscale.PgTarget(args.database, f"batchd_scale_{args.history}")
            if pgscale.built(db) != args.history:
                print(f"building schema {db.schema} ({args.history:,} tasks) ...")
                print(f"  built in {pgscale.build(db, args.history):.0f} s")
        elif args.db is None:
            parser.error(f"{args.what}: --db PATH or --database URL")
        else:
            db = args.db
        if args.what == "reads":
            reads(db, args.pending, results=not args.skip_results)
        else:
            prune_parts(db, args.rows, args.rounds, cli=args.cli)
    elif args.what == "deep":
        deep(args.tasks, args.batch_size)
    else:
        trigger_costs(args.tasks, args.rounds)


if __name__ == "__main__":
    main()
