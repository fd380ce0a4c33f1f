"""End to end: batchd against the floor and against a plain SDK script, same tasks, same fake.

    python3 bench/e2e.py [--tasks 100000] [--batch-size 10000] [--no-sdk] [--profile FILE]
                         [--database postgresql://user@host/db]

With --database the same tasks also run end to end on PostgreSQL (a schema of their own in
that database, dropped afterwards), in the same run: both ratios are printed.

The fake API runs in a child process (`batchd fake-api --port 0 --processing-seconds 0`),
and so does the daemon (`batchd run --exit-when-idle`). Each contender gets its own copy
of the freshly ingested database.

Two floors: the network floor (plain aiohttp + sqlite3 against the same fake, so it
includes loopback HTTP and the fake's own CPU), and the local floor (no daemon, no HTTP:
read the rows, splice the request bodies, parse the fake's shuffled result lines with
orjson, update the rows in one plain sqlite3 transaction per batch). The local floor is
what the daemon's own CPU is held against (issue 16: at most 2.0x); it runs twice (before
and after the network floor), and each ratio uses the lower of the two figures (the
stricter ratio): the daemon's CPU against the floor's CPU (both processes' user + system
time, so the comparison holds on a loaded machine), and the daemon's wall time against the
floor's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import anthropic
import asyncpg
import orjson

from batchd.api.resultstream import iter_lines
from batchd.config import DatabaseConfig
from batchd.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    DaemonRun,
    FakeApiProcess,
    command_line,
    fake_lines,
    machine,
    run_daemon,
    tasks,
    write_config,
)

HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}
_SELECT = "SELECT custom_id, params FROM tasks WHERE status = 'pending' ORDER BY id"
_UPDATE = (
    "UPDATE tasks SET status = ?, result = ?, model = ?, input_tokens = ?, output_tokens = ?,"
    " completed_at = ? WHERE custom_id = ?"
)


async def ingest(db: Path, count: int, database: DatabaseConfig | None = None) -> float:
    """What `batchd enqueue` does: Store.enqueue in chunked transactions."""
    started = time.perf_counter()
    store = await open_store(database or DatabaseConfig(path=db))
    try:
        report = await store.enqueue(tasks(count))
    finally:
        await store.close()
    assert report.inserted == count, report
    return time.perf_counter() - started


def copy_db(source: Path, target: Path) -> Path:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return target


def _update_row(result: dict[str, object], custom_id: str, now: str) -> tuple[object, ...]:
    message = result.get("message")
    usage = message.get("usage", {}) if isinstance(message, dict) else {}
    return (
        result["type"],
        orjson.dumps(result).decode(),
        message.get("model") if isinstance(message, dict) else None,
        usage.get("input_tokens"),
        usage.get("output_tokens"),
        now,
        custom_id,
    )


def _splice(rows: list[tuple[str, str]]) -> bytes:
    return b'{"requests":[%s]}' % b",".join(
        b'{"custom_id":"%s","params":%s}' % (cid.encode(), params.encode()) for cid, params in rows
    )


def _write_back(db: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany(_UPDATE, rows)
    db.execute("COMMIT")


async def floor(db_path: Path, base_url: str, batch_size: int) -> float:
    """The least work: read rows, splice bodies, POST, poll, stream, parse, write back."""
    started = time.perf_counter()
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    rows = db.execute(_SELECT).fetchall()
    url = base_url + "/v1/messages/batches"
    now = datetime.now(UTC).isoformat()
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        for start in range(0, len(rows), batch_size):
            body = _splice(rows[start : start + batch_size])
            async with session.post(url, data=body) as resp:
                batch = await resp.json()
            while batch["processing_status"] != "ended":
                await asyncio.sleep(0.1)
                async with session.get(f"{url}/{batch['id']}") as resp:
                    batch = await resp.json()
            updates = []
            async with session.get(batch["results_url"]) as resp:
                async for line in iter_lines(resp.content.iter_any(), 1 << 28):
                    record = orjson.loads(line)
                    updates.append(_update_row(record["result"], record["custom_id"], now))
            _write_back(db, updates)
    db.close()
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class LocalFloor:
    wall_s: float
    cpu_s: float  # this process's CPU (user + system) over the same span


def batch_lines(count: int, batch_size: int) -> list[list[bytes]]:
    """The fake's own result lines for each batch, shuffled as it serves them (untimed)."""
    return [
        fake_lines(min(batch_size, count - first), first) for first in range(0, count, batch_size)
    ]


def local_floor(db_path: Path, lines: list[list[bytes]], batch_size: int) -> LocalFloor:
    """The least local work, no network: read rows, splice bodies, parse lines, write back."""
    started, cpu = time.perf_counter(), time.process_time()
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    rows = db.execute(_SELECT).fetchall()
    now = datetime.now(UTC).isoformat()
    spliced = 0
    for number, start in enumerate(range(0, len(rows), batch_size)):
        spliced += len(_splice(rows[start : start + batch_size]))
        updates = []
        for line in lines[number]:
            record = orjson.loads(line)
            updates.append(_update_row(record["result"], record["custom_id"], now))
        _write_back(db, updates)
    db.close()
    assert spliced > 0
    return LocalFloor(time.perf_counter() - started, time.process_time() - cpu)


def sdk_script(db_path: Path, base_url: str, batch_size: int) -> float:
    """What a user would write with the official SDK: create, poll, results, update."""
    started = time.perf_counter()
    client = anthropic.Anthropic(api_key="bench", base_url=base_url)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    rows = db.execute(_SELECT).fetchall()
    now = datetime.now(UTC).isoformat()
    for start in range(0, len(rows), batch_size):
        requests = [
            {"custom_id": cid, "params": orjson.loads(params)}
            for cid, params in rows[start : start + batch_size]
        ]
        batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        while batch.processing_status != "ended":
            time.sleep(0.1)
            batch = client.messages.batches.retrieve(batch.id)
        updates = [
            _update_row(entry.result.model_dump(mode="json"), entry.custom_id, now)
            for entry in client.messages.batches.results(batch.id)
        ]
        _write_back(db, updates)
    db.close()
    client.close()
    return time.perf_counter() - started


def check_done(db_path: Path, count: int) -> None:
    with sqlite3.connect(db_path) as db:
        done = db.execute(
            "SELECT count(*) FROM tasks WHERE status = 'succeeded' AND result IS NOT NULL"
        ).fetchone()[0]
    db.close()
    if done != count:
        raise SystemExit(f"{db_path}: only {done} of {count} tasks have their result")


def stages(run: DaemonRun) -> list[tuple[str, float]]:
    """Cumulative seconds since the daemon logged `daemon_started`, per stage end."""
    [start] = run.times("daemon_started")
    marks = [
        ("chunk+submit (last batch_created)", "batch_created"),
        ("poll (last batch_ended)", "batch_ended"),
        ("results written (last results_written)", "results_written"),
        ("idle exit (daemon_stopped)", "daemon_stopped"),
    ]
    # A batch the API reports ended in its create answer is never polled: no batch_ended.
    return [(label, max(run.times(event), default=start) - start) for label, event in marks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000, help="[batching] max_requests")
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK script")
    parser.add_argument("--profile", type=Path, help="cProfile the daemon into this file")
    parser.add_argument("--database", help="also run on this PostgreSQL database (a URL)")
    parser.add_argument(
        "--profile-postgres", type=Path, help="cProfile the daemon on PostgreSQL into this file"
    )
    args = parser.parse_args()
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        work = Path(tmp)
        ingest_s = asyncio.run(ingest(work / "batchd.db", args.tasks))
        print(f"ingest (Store.enqueue) {args.tasks:,} tasks: {ingest_s:.2f} s")
        floor_db = copy_db(work / "batchd.db", work / "floor.db")
        local_dbs = [copy_db(work / "batchd.db", work / f"local-{n}.db") for n in (1, 2)]
        sdk_db = copy_db(work / "batchd.db", work / "sdk.db")
        with FakeApiProcess("--processing-seconds", "0") as fake:
            config = write_config(
                work / "batchd.toml",
                work / "batchd.db",
                fake.base_url,
                max_requests=args.batch_size,
            )
            run = run_daemon(config, profile=args.profile)
            if run.exit_code != 0:
                raise SystemExit(f"daemon exited with {run.exit_code}")
            check_done(work / "batchd.db", args.tasks)
            # Only now: the daemon's peak RSS (ru_maxrss) counts what this process held
            # when it forked the daemon.
            lines = batch_lines(args.tasks, args.batch_size)
            locals_ = [local_floor(local_dbs[0], lines, args.batch_size)]
            check_done(local_dbs[0], args.tasks)
            floor_s = asyncio.run(floor(floor_db, fake.base_url, args.batch_size))
            check_done(floor_db, args.tasks)
            locals_.append(local_floor(local_dbs[1], lines, args.batch_size))
            check_done(local_dbs[1], args.tasks)
            del lines
            sdk_s = None
            if not args.no_sdk:
                sdk_s = sdk_script(sdk_db, fake.base_url, args.batch_size)
                check_done(sdk_db, args.tasks)
            report(run, floor_s, sdk_s, locals_)
            if args.database:
                ingest_pg, run_pg, server_s = on_postgres(args.database, work, fake.base_url, args)
                print(
                    f"ingest on PostgreSQL (Store.enqueue) {args.tasks:,} tasks: {ingest_pg:.2f} s"
                )
                report_postgres(run_pg, server_s, run, floor_s)


def on_postgres(
    url: str, work: Path, base_url: str, args: argparse.Namespace
) -> tuple[float, DaemonRun, float]:
    """The same tasks, the same fake, on PostgreSQL: a schema of its own, dropped after
    (the URL's role needs CREATE on that database)."""
    schema = f"bench_{secrets.token_hex(4)}"
    database = DatabaseConfig(url=url, schema=schema)
    try:
        ingest_s = asyncio.run(ingest(work / "unused.db", args.tasks, database))
        # The daemon's sessions carry the schema's name, so the server's CPU for them can
        # be told from other sessions' (ServerCpu).
        named = url + ("&" if "?" in url else "?") + f"application_name={schema}"
        config = write_config(
            work / "postgres.toml",
            work / "unused.db",
            base_url,
            url=named,
            schema=schema,
            max_requests=args.batch_size,
        )
        with ServerCpu(url, schema) as server:
            run = run_daemon(config, profile=args.profile_postgres)
        if run.exit_code != 0:
            raise SystemExit(f"daemon on PostgreSQL exited with {run.exit_code}")
        done = asyncio.run(_pg_succeeded(url, schema))
        if done != args.tasks:
            raise SystemExit(f"PostgreSQL: only {done} of {args.tasks} tasks have their result")
    finally:
        asyncio.run(_pg_drop(url, schema))
    return ingest_s, run, server.seconds


async def _pg_succeeded(url: str, schema: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval(
            f"SELECT count(*) FROM \"{schema}\".tasks WHERE status = 'succeeded'"
        )
        return count
    finally:
        await conn.close()


async def _pg_drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# The daemon's sessions: named after the run (this batchd), or `batchd` (an older batchd,
# which ignores the URL's name: then the bench's database must be the bench's alone).
_SESSIONS = """
SELECT pid FROM pg_stat_activity WHERE datname = current_database()
    AND application_name IN ($1, 'batchd') AND pid <> pg_backend_pid()"""


class ServerCpu:
    """CPU time of the PostgreSQL server processes serving the sessions named `name`
    (application_name), read from /proc while they run: the server must be on this
    machine. Sampled every 50 ms, so up to 50 ms of each session's last work is missed."""

    def __init__(self, url: str, name: str) -> None:
        self._url = url
        self._name = name
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    @property
    def seconds(self) -> float:
        return sum(self._cpu.values())

    def __enter__(self) -> ServerCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(_SESSIONS, self._name)
                for (pid,) in rows:
                    seconds = self._cpu_of(pid)
                    if seconds is not None:
                        self._cpu[pid] = seconds
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def _cpu_of(self, pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None  # ended meanwhile
        # utime and stime, fields 14 and 15 of proc(5): 12th and 13th after the name.
        return (int(fields[11]) + int(fields[12])) / self._tick


def report_postgres(run: DaemonRun, server_s: float, sqlite: DaemonRun, floor_s: float) -> None:
    print(f"batchd on PostgreSQL: {run.wall_s:.2f} s wall from spawn to exit")
    for label, seconds in stages(run):
        print(f"  {label}: {seconds:.2f} s")
    # ru_maxrss also counts this process's own pages at the fork (it holds more by now
    # than when the SQLite daemon was forked): the samples of the daemon's VmRSS are its own.
    sampled = max((mb for _, mb in run.rss_samples), default=0.0)
    print(
        f"  peak RSS {run.peak_rss_mb:.0f} MB (ru_maxrss), {sampled:.0f} MB (sampled VmRSS),"
        f" CPU {run.cpu_s:.2f} s; the server's CPU for its sessions ~{server_s:.2f} s"
    )
    print(
        f"PostgreSQL / SQLite = {run.wall_s / sqlite.wall_s:.2f}x;"
        f" PostgreSQL / floor = {run.wall_s / floor_s:.2f}x"
    )


def report(run: DaemonRun, floor_s: float, sdk_s: float | None, locals_: list[LocalFloor]) -> None:
    [start] = run.times("daemon_started")
    batchd_s = max(run.times("daemon_stopped")) - start
    print(f"batchd: {run.wall_s:.2f} s wall from spawn to exit ({batchd_s:.2f} s from start)")
    for label, seconds in stages(run):
        print(f"  {label}: {seconds:.2f} s")
    print(f"  peak RSS {run.peak_rss_mb:.0f} MB, CPU {run.cpu_s:.2f} s")
    print(f"floor: {floor_s:.2f} s; batchd / floor = {run.wall_s / floor_s:.2f}x")
    floor_cpu = min(floor.cpu_s for floor in locals_)
    floor_wall = min(floor.wall_s for floor in locals_)
    runs = ", ".join(f"{floor.wall_s:.2f} s wall / {floor.cpu_s:.2f} s CPU" for floor in locals_)
    print(f"local floor (no network), two runs: {runs}")
    print(
        f"  daemon CPU {run.cpu_s:.2f} s / local floor CPU = {run.cpu_s / floor_cpu:.2f}x"
        f" (/ local floor wall: {run.cpu_s / floor_wall:.2f}x);"
        f" daemon wall / local floor wall = {run.wall_s / floor_wall:.2f}x"
    )
    if sdk_s is not None:
        print(f"SDK script: {sdk_s:.2f} s; SDK / batchd = {sdk_s / run.wall_s:.2f}x")


if __name__ == "__main__":
    main()
