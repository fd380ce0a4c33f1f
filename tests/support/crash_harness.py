"""The crash harness: `batchd run` as a real process, killed, restarted, then checked.

The fake API runs in the test's own event loop, so it outlives every daemon process and
keeps its batches (and its count of submissions per custom_id) across restarts.
Kills are either deterministic (`BATCHD_CRASH_AT`, see batchd/crashpoints.py) or at a
seeded random moment (SIGKILL from here).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from batchd.config import DatabaseConfig
from batchd.domain import FINAL_TASK_STATUSES
from batchd.fakeapi.server import FakeApiServer
from batchd.store import open_store
from tests.support.backends import Peek, SqlitePeek
from tests.support.ledger import Tokens, billed_by_fake, recorded_in_ledger
from tests.support.params import request_params

BATCHD = [sys.executable, "-m", "batchd"]
# Batch states that leave nothing to do; anything else at the end is a stuck batch.
SETTLED_BATCH_STATES = frozenset({"completed", "rejected", "lost"})


def prompt(n: int) -> str:
    return f"Crash-test question number {n}, answer in one line"


def custom_id(n: int) -> str:
    return f"crash-{n}"


@dataclass(frozen=True)
class DaemonSetup:
    """A database, a config file pointing at it, and the environment to run batchd with."""

    directory: Path
    database: DatabaseConfig
    config_path: Path
    env: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.database.path


def write_config(
    directory: Path,
    base_url: str,
    database: DatabaseConfig | None = None,
    **sections: dict[str, object],
) -> DaemonSetup:
    """Quick timings and small batches and result chunks, so every run is short. The
    database: `database` (a SQLite file or a PostgreSQL URL and schema), else crash.db."""
    database = database or DatabaseConfig(path=directory / "crash.db")
    if database.url is None:
        where: dict[str, object] = {"path": str(database.path)}
    else:
        where = {"url": database.url, **({"schema": database.schema} if database.schema else {})}
    values: dict[str, dict[str, object]] = {
        "database": where,
        "api": {"max_retries": 2, "request_timeout_seconds": 5.0},
        "batching": {
            "max_requests": 4,
            "linger_seconds": 0.05,
            "reconcile_grace_seconds": 5.0,  # the least config.py accepts
            "duplicate_watch_seconds": 2.0,  # a short watch: --exit-when-idle waits for it
            "max_attempts": 3,
        },
        "polling": {"interval_seconds": 0.1, "not_found_grace_seconds": 1.0},
        # A short collection lease (PostgreSQL): a batch whose collector was killed is
        # taken over (by a restart, or another daemon) this long after its last renewal.
        "results": {"chunk_size": 2, "lease_seconds": 2.0},
        "logging": {"format": "json", "level": "info"},
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    lines = []
    for name, table in values.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    config_path = directory / "batchd.toml"
    config_path.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-crash-test",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("BATCHD_CRASH_AT", None)
    return DaemonSetup(directory, database, config_path, env)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return repr(value)


async def enqueue(setup: DaemonSetup, count: int, *, first: int = 0) -> None:
    """Tasks `crash-<first>` to `crash-<first + count - 1>`."""
    store = await open_store(setup.database)
    try:
        tasks = ((custom_id(n), request_params(prompt(n))) for n in range(first, first + count))
        await store.enqueue(tasks)
    finally:
        await store.close()


@dataclass(frozen=True)
class DaemonRun:
    returncode: int
    seconds: float
    crash_point: str | None  # the point that killed it, as the daemon reported it
    stderr: str
    log_path: Path

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


@dataclass
class RunLog:
    """Every run of one scenario, for the final figures."""

    runs: list[DaemonRun] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(run.killed for run in self.runs)

    @property
    def points(self) -> set[str]:
        return {run.crash_point.split(":")[0] for run in self.runs if run.crash_point}


def daemon_command(
    setup: DaemonSetup, *, crash_at: str | None, exit_when_idle: bool
) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment of one `batchd run` of this setup."""
    env = dict(setup.env)
    if crash_at is not None:
        env["BATCHD_CRASH_AT"] = crash_at
    args = [*BATCHD, "--config", str(setup.config_path), "run"]
    if exit_when_idle:
        args.append("--exit-when-idle")
    return args, env


async def run_daemon(
    setup: DaemonSetup,
    log: RunLog,
    *,
    crash_at: str | None = None,
    kill_after_s: float | None = None,
    exit_when_idle: bool = True,
    timeout_s: float = 30.0,
) -> DaemonRun:
    """One `batchd run` process until it exits, is killed at `crash_at`, or after a delay."""
    args, env = daemon_command(setup, crash_at=crash_at, exit_when_idle=exit_when_idle)
    log_path = setup.directory / f"daemon-{len(log.runs)}.log"
    started = time.monotonic()
    with log_path.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=out, stderr=asyncio.subprocess.PIPE
        )
        try:
            returncode = await _wait(process, kill_after_s, timeout_s)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.stderr is not None
        stderr = (await process.stderr.read()).decode(errors="replace")
    reached = next(
        (
            line.removeprefix("batchd crash point reached: ").strip()
            for line in stderr.splitlines()
            if line.startswith("batchd crash point reached: ")
        ),
        None,
    )
    run = DaemonRun(returncode, time.monotonic() - started, reached, stderr, log_path)
    log.runs.append(run)
    return run


async def _wait(
    process: asyncio.subprocess.Process, kill_after_s: float | None, timeout_s: float
) -> int:
    if kill_after_s is not None:
        try:
            return await asyncio.wait_for(process.wait(), kill_after_s)
        except TimeoutError:
            process.send_signal(signal.SIGKILL)
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"batchd run did not finish within {timeout_s} s") from None


@dataclass(frozen=True)
class Ledger:
    """What the end state proves; every count should be zero but `tasks`."""

    tasks: int
    not_final: list[str]
    wrong_results: list[str]
    unaccounted_submissions: dict[str, tuple[int, int]]  # custom_id: (sent, accounted)
    unsettled_batches: list[tuple[int, str]]
    unmatched_results: int
    duplicate_batches: int
    submissions: int
    # Money: what the fake billed (succeeded lines, every batch), and the usage ledger.
    billed: Tokens
    recorded: Tokens


def check_invariants(database: Path | Peek, server: FakeApiServer) -> Ledger:
    """Every task final, every result its own, every submission known to the database,
    every billed result in its usage ledger (a SQLite file's path, or a `Peek` at either
    store)."""
    peek = SqlitePeek(database) if isinstance(database, Path) else database
    tasks = peek.query("SELECT custom_id, status, result, attempts FROM tasks")
    batches = peek.query("SELECT id, state FROM batches")
    unmatched = peek.query("SELECT count(*) FROM unmatched_results")[0][0]
    duplicates = [row[0] for row in peek.query("SELECT api_batch_id FROM duplicate_batches")]
    # A suspected duplicate batch was recorded: its requests are accounted for.
    recorded_extra: Counter[str] = Counter()
    for api_batch_id in duplicates:
        recorded_extra.update(server.state.batches[api_batch_id].requests.custom_ids)
    sent = server.state.stats.submissions
    not_final, wrong, unaccounted = [], [], {}
    for cid, status, result, attempts in tasks:
        if status not in FINAL_TASK_STATUSES:
            not_final.append(f"{cid}={status}")
        if status == "succeeded" and not _answers(result, cid):
            wrong.append(cid)
        accounted = attempts + recorded_extra[cid]
        if sent[cid] != accounted:
            unaccounted[cid] = (sent[cid], accounted)
    return Ledger(
        tasks=len(tasks),
        not_final=not_final,
        wrong_results=wrong,
        unaccounted_submissions=unaccounted,
        unsettled_batches=[(i, s) for i, s in batches if s not in SETTLED_BATCH_STATES],
        unmatched_results=unmatched,
        duplicate_batches=len(duplicates),
        submissions=sum(sent.values()),
        billed=billed_by_fake(server.state),
        recorded=recorded_in_ledger(peek),
    )


def candidate_harvests(database: Path | Peek) -> list[tuple[str, str | None]]:
    """(state, origin) of every suspected duplicate's harvest row, by detection."""
    peek = SqlitePeek(database) if isinstance(database, Path) else database
    rows = peek.query(
        "SELECT b.state, b.origin FROM duplicate_batches AS d"
        " JOIN batches AS b ON b.id = d.harvest_id ORDER BY d.detected_at"
    )
    return [(state, origin) for state, origin in rows]


def _answers(result: str | None, cid: str) -> bool:
    """The fake echoes the user's message: the answer must quote this task's own prompt."""
    if result is None:
        return False
    text = orjson.loads(result)["message"]["content"][0]["text"]
    return prompt(int(cid.removeprefix("crash-"))) in text


def assert_nothing_lost_or_duplicated(ledger: Ledger, expected_tasks: int) -> None:
    assert ledger.tasks == expected_tasks
    assert ledger.not_final == []
    assert ledger.wrong_results == []
    assert ledger.unaccounted_submissions == {}
    assert ledger.unsettled_batches == []
    assert ledger.unmatched_results == 0
    assert ledger.duplicate_batches == 0
    assert ledger.recorded == ledger.billed  # money paid is money recorded, once


async def start_daemon(
    setup: DaemonSetup, n: int, *, crash_at: str | None = None, exit_when_idle: bool = True
) -> asyncio.subprocess.Process:
    """`batchd run` number `n` in the background, its log in `daemon-<n>.log`."""
    args, env = daemon_command(setup, crash_at=crash_at, exit_when_idle=exit_when_idle)
    with (setup.directory / f"daemon-{n}.log").open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )


def log_events(setup: DaemonSetup, n: int, event: str | None) -> list[dict[str, object]]:
    """Daemon `n`'s JSON log lines of `event` (None: every line), in order."""
    found = []
    for line in (setup.directory / f"daemon-{n}.log").read_bytes().splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the line being written as we read
        if event is None or entry.get("event") == event:
            found.append(entry)
    return found


async def logged(setup: DaemonSetup, n: int, event: str, within_s: float) -> float:
    """Seconds until daemon `n` logs `event` (fails after `within_s`)."""
    started = time.monotonic()
    while not log_events(setup, n, event):
        if time.monotonic() - started > within_s:
            raise AssertionError(f"daemon {n} did not log {event} within {within_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def instance_of(setup: DaemonSetup, n: int) -> str:
    """Daemon `n`'s name in the collection leases (`batches.collector`)."""
    [started] = log_events(setup, n, "daemon_started")
    return str(started["instance"])
