"""The floor of `batchd prune --export` on this machine: the least work the command does,
done without batchd (issue 16's rate for prune is judged against 100,000 rows/s).

    python3 bench/prunefloor.py --db PATH [--rows 100000] [--rounds 3]
    python3 bench/prunefloor.py --database postgresql://... [--rows 100000] [--rounds 3]

On a COPY of a history database, as `bench/flat.py prune` (it adds `--rows` finished tasks
completed 400 days ago before each round, and checks every one is gone after it). Each
round runs, one after the other:
- **delete only**: the rows' ids read from tasks_by_completion, then deleted in
  transactions of 25,000 (batchd's size) by the same DELETE batchd sends, with the
  schema's triggers (the status counts, the batches to check): a prune without export.
- **export and delete**: the same deletes, each run by a thread (SQLite) or a connection
  (PostgreSQL) of its own while the next transaction's export lines are read and written
  (batchd's line SQL, `store/*/pruning.py`), the file synced before each delete: a
  prune with `--export` as batchd pipelines it, with nothing else (no process start-up,
  no asyncio, no store). PostgreSQL reads its lines on three connections at once.
Figures: wall seconds and rows/s of each. `bench/flat.py prune --cli` times the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import asyncpg
import flat
from pgscale import PgTarget, quote_ident

from batchd.store.postgres import pruning as pg_pruning
from batchd.store.postgres.inflight import InOrder
from batchd.store.sqlite import pruning as sqlite_pruning

_DELETE_ROWS = 25_000
_PAGE = 2000
_FINAL = "('canceled', 'errored', 'expired', 'invalid', 'succeeded')"


def _cutoff() -> datetime:
    return datetime.now(UTC) - timedelta(days=365)


def sqlite_round(path: Path, out: Path | None) -> float:
    cutoff = _cutoff().strftime("%Y-%m-%dT%H:%M:%S.000Z")
    deleter = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    deleter.execute("PRAGMA synchronous = FULL")
    deleter.execute("PRAGMA secure_delete = FAST")
    reader = sqlite3.connect(path, isolation_level=None)
    doomed: queue.Queue[list[int] | None] = queue.Queue(maxsize=1)

    def delete() -> None:
        while (ids := doomed.get()) is not None:
            deleter.execute("BEGIN IMMEDIATE")
            deleter.execute(
                "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
                f" AND +status IN {_FINAL} AND completed_at < ?",
                (str(ids), cutoff),
            )
            deleter.execute("COMMIT")

    thread = threading.Thread(target=delete, daemon=True)
    started = time.perf_counter()
    thread.start()
    columns = (
        "completed_at, id" if out is None else f"completed_at, id, {sqlite_pruning._LINE_BYTES}"
    )
    first, same_time, later = (
        sql.replace(":cutoff", "?").replace(":limit", str(_PAGE))
        for sql in sqlite_pruning._pages(columns, "" if out is None else f"+status IN {_FINAL}")
    )
    file: IO[bytes] | None = out.open("wb") if out is not None else None
    ids: list[int] = []
    key: tuple[Any, int] | None = None
    while True:
        if key is None:
            rows = reader.execute(first, (cutoff,)).fetchall()
        else:
            rows = reader.execute(
                same_time.replace(":time", "?").replace(":id", "?"), key
            ).fetchall()
            if len(rows) < _PAGE:
                rows += reader.execute(
                    later.replace(":time", "?").replace(":limit", str(_PAGE - len(rows))),
                    (cutoff, key[0]),
                ).fetchall()
        if not rows:
            break
        key = (rows[-1][0], rows[-1][1])
        if file is not None:
            file.write(b"\n".join(row[2] for row in rows) + b"\n")
        ids += [row[1] for row in rows]
        if len(ids) >= _DELETE_ROWS:
            _sync(file)
            doomed.put(ids)
            ids = []
    if ids:
        _sync(file)
        doomed.put(ids)
    doomed.put(None)
    thread.join()
    wall = time.perf_counter() - started
    if file is not None:
        file.close()
    reader.close()
    deleter.close()
    return wall


def _sync(file: IO[bytes] | None) -> None:
    if file is not None:
        file.flush()
        os.fsync(file.fileno())


async def pg_round(target: PgTarget, out: Path | None) -> float:
    cutoff = _cutoff()
    settings = {"search_path": quote_ident(target.schema), "enable_sort": "off", "jit": "off"}
    conns = [await asyncpg.connect(target.url, server_settings=settings) for _ in range(4)]
    deleter, readers = conns[0], conns[1:]
    started = time.perf_counter()
    bounds_first, bounds_after = pg_pruning._bounds_sql(cutoff, _PAGE)
    page_first, page_between = pg_pruning._page_between_sql(cutoff)
    if out is None:  # batchd's prune without export: each transaction a range of the index
        key_of: tuple[datetime, int] | None = None
        while True:
            async with deleter.transaction():
                _, key_of = await pg_pruning.delete_page(deleter, cutoff, key_of, _DELETE_ROWS)
            if key_of is None:
                break
        wall = time.perf_counter() - started
        for conn in conns:
            await conn.close()
        return wall
    # Every page's bounds first (from the index alone), then the pages three at a time
    # in order, each written as it comes, a delete behind every 25,000 lines.
    ends: list[tuple[datetime, int]] = []
    while True:
        after = () if not ends else ends[-1]
        bounds = await readers[0].fetch(bounds_after if ends else bounds_first, *after)
        ends += [(row[0], row[1]) for row in bounds]
        if len(bounds) < 10:
            break
    file = out.open("wb")
    running: asyncio.Task[Any] | None = None
    ids: list[int] = []
    reads = InOrder(readers)
    starts: list[tuple[datetime, int] | None] = [None, *ends[:-1]]
    pending = list(zip(starts, ends, strict=True))
    while pending or reads.in_flight():
        while pending and reads.idle() is not None:
            start, end = pending.pop(0)
            if start is None:
                reads.issue(page_first, *end)
            else:
                reads.issue(page_between, *start, *end)
        rows = await reads.next_rows()
        file.write(b"".join(row[2] for row in rows))
        ids += [row[1] for row in rows]
        if len(ids) >= _DELETE_ROWS or (not pending and not reads.in_flight()):
            _sync(file)
            if running is not None:
                await running
            running = asyncio.ensure_future(_pg_delete(deleter, ids, cutoff))
            ids = []
    if running is not None:
        await running
    wall = time.perf_counter() - started
    file.close()
    for conn in conns:
        await conn.close()
    return wall


async def _pg_delete(conn: asyncpg.Connection, ids: list[int], cutoff: datetime) -> None:
    async with conn.transaction():
        await pg_pruning.delete_ids(conn, ids, cutoff)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", type=Path, help="a COPY of a SQLite history database")
    where.add_argument("--database", help="PostgreSQL URL (bench/scale.py's kept history schema)")
    parser.add_argument("--schema", help="PostgreSQL schema (default: scale.py's of 2,000,000)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    target: Path | PgTarget = (
        args.db if args.db else PgTarget(args.database, args.schema or "batchd_scale_2000000")
    )
    print(f"# python3 {' '.join(sys.argv)}")
    flat.remove_added(target)
    with tempfile.TemporaryDirectory(prefix="batchd-prunefloor-") as tmp:
        for _ in range(args.rounds):
            for out in (None, Path(tmp) / "pruned.jsonl"):
                flat.add_rows(target, args.rows, old=True)
                if isinstance(target, PgTarget):
                    wall = asyncio.run(pg_round(target, out))
                else:
                    wall = sqlite_round(target, out)
                label = "export and delete" if out else "delete only"
                lines = sum(1 for _ in out.open("rb")) if out else 0
                print(f"  floor, {label}: {args.rows:,} rows in {wall:.2f} s,"
                      f" {args.rows / wall:,.0f} rows/s" + (f", {lines:,} lines" if out else ""),
                      flush=True)  # fmt: skip
                left = flat._added_left(target)
                assert left == 0, f"{left} added rows left"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
