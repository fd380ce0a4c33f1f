"""API faults from the fake's fault injection: the daemon backs off, fails no task because
of a transport fault, catches up, and stops loudly on a refused key.

The daemon runs in-process (run_daemon) against the fake over loopback; its fault
counters say what was injected, the database says what the daemon made of it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchd.api import RetryPolicy
from batchd.config import Config
from batchd.fakeapi.faults import ENDPOINTS, Endpoint, FaultConfig, FaultKind
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.fakeapi.state import Timeline
from batchd.service.daemon import EXIT_AUTH, Daemon, run_daemon
from batchd.service.metrics import API_REQUESTS, RESULTS_WRITTEN
from batchd.store import Store
from tests.support.fakeapi import refuse_in_fake
from tests.support.params import request_params


def prompt(n: int) -> str:
    return f"Fault-test question {n}, answer briefly"


async def enqueue(store: Store, count: int, prefix: str = "f") -> list[str]:
    ids = [f"{prefix}-{n}" for n in range(count)]
    await store.enqueue((cid, request_params(prompt(n))) for n, cid in enumerate(ids))
    return ids


def task_rows(db_path: Path) -> dict[str, tuple[str, int, str | None]]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT custom_id, status, attempts, error FROM tasks").fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def assert_all_succeeded_once(db_path: Path, fake: FakeApiServer) -> None:
    """Every task succeeded, sent exactly as often as the database says (once)."""
    rows = task_rows(db_path)
    assert {status for status, _, _ in rows.values()} == {"succeeded"}, rows
    sent = fake.state.stats.submissions
    assert {cid: sent[cid] for cid in rows} == {cid: a for cid, (_, a, _) in rows.items()}
    assert {attempts for _, attempts, _ in rows.values()} == {1}


class Running:
    """The daemon as a background task, with the Daemon object once it started."""

    def __init__(self, config: Config, api_key: str = "test-key") -> None:
        self.started = asyncio.Event()
        self.daemon: Daemon | None = None
        self.task = asyncio.create_task(
            run_daemon(config, api_key, exit_when_idle=True, on_started=self._keep)
        )

    async def _keep(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.started.set()

    async def result(self, timeout_s: float) -> int:
        return await asyncio.wait_for(self.task, timeout_s)


async def wait_for(
    check: Callable[[], Coroutine[Any, Any, bool]], timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def batches_in(db_path: Path, *states: str) -> int:
    with sqlite3.connect(db_path) as db:
        marks = ",".join("?" * len(states))
        return int(
            db.execute(f"SELECT count(*) FROM batches WHERE state IN ({marks})", states).fetchone()[
                0
            ]
        )


TRANSPORT_FAULTS: tuple[FaultKind, ...] = (
    "429",
    "500",
    "503",
    "504",
    "529",
    "drop",
    "slow",
    "commit_drop",
    "truncate",
)
# A 5xx on create is an unknown outcome, resolved by reconciliation (one grace each): the
# "500" case covers that path, the other 5xx kinds hit the read endpoints only, to stay quick.
READ_ENDPOINTS: tuple[Endpoint, ...] = ("retrieve", "list", "results")


@pytest.mark.parametrize("kind", TRANSPORT_FAULTS)
async def test_a_transport_fault_on_any_call_fails_no_task_and_pays_nothing_twice(
    kind: FaultKind, store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    faults = FaultConfig(
        http_fault_rate=0.2,
        http_fault_kinds=(kind,),
        http_fault_endpoints=READ_ENDPOINTS if kind in ("503", "504", "529") else ENDPOINTS,
        retry_after_seconds=0.2,
        slow_seconds=0.3,
    )
    await enqueue(store, 12)
    await store.close()
    # Seed 32 draws a fault on the first calls: every kind is met, whatever the timing.
    async with FakeApiServer(FakeApiConfig(processing_seconds=0.2, seed=32, faults=faults)) as fake:
        config = daemon_config(fake.base_url, max_requests=4, reconcile_grace_s=0.5)
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
        injected = fake.faults.injected[kind]
        assert_all_succeeded_once(db_path, fake)
    assert injected > 0  # the fault really was met
    print(f"\n{kind}: injected {injected}")


@pytest.mark.parametrize("mode", ["503", "drop"])
async def test_api_down_for_a_while_the_daemon_backs_off_and_catches_up(
    mode: str, store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config]
) -> None:
    down_s = 3.0
    await enqueue(store, 40)
    config = daemon_config(fake_api.base_url, max_requests=10, reconcile_grace_s=0.5)
    # The shipped retry count: a poll's retry chain (at least 0.375 + 0.75 + 1.5 + 3 + 6 s)
    # then outlasts the outage, so no new chain starts inside it.
    config = replace(config, api=replace(config.api, max_retries=RetryPolicy().max_retries))
    fake_api.state.timeline = Timeline(processing_seconds=2.0)
    running = Running(config)
    await wait_for(
        lambda: _at_least_in_progress(config.database.path, 2), 20, "two batches in flight"
    )
    await store.enqueue([("late-1", request_params("arrived while the API was down"))])

    callers = batches_in(config.database.path, "in_progress") + 1  # + the submitter
    fake_api.faults.go_down(fake_api.clock(), down_s, mode)  # type: ignore[arg-type]
    await asyncio.sleep(down_s)
    calls_while_down = fake_api.faults.injected["down"]
    assert not running.task.done()  # it kept running through the outage
    assert await running.result(30) == 0
    assert_all_succeeded_once(config.database.path, fake_api)
    # Each batch's polls are one caller's retry chain, told apart by path. Spinning at the
    # 0.1 s poll interval would be 30 calls in 3 s (60 with aiohttp's own retry of a request
    # whose keep-alive connection was dropped). The client's backoff (0.5 s doubling, jitter
    # at most -25%) allows at most 4 attempts within 3 s (at 0, >=0.375, >=1.125,
    # >=2.625 s), twice that when each is retried once by aiohttp: 8. A loaded machine only
    # delays attempts, so this holds whatever the timing.
    polls = {
        path: calls
        for path, calls in fake_api.faults.down_calls.items()
        if path.startswith("GET /v1/messages/batches/msgbatch_") and "/results" not in path
    }
    print(f"\nAPI down ({mode}) {down_s} s: {calls_while_down} calls, {callers} callers")
    print(f"polls while down, per batch: {sorted(polls.values())}")
    assert calls_while_down > 0
    assert polls, "no batch was polled while the API was down"
    assert max(polls.values()) <= 8


async def _at_least_in_progress(db_path: Path, count: int) -> bool:
    return batches_in(db_path, "in_progress") >= count


async def test_a_refused_key_stops_submission_with_exit_78_and_no_retry_loop(
    store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await enqueue(store, 5)
    async with FakeApiServer(
        FakeApiConfig(api_key="the-right-key", processing_seconds=0.2)
    ) as fake:
        running = Running(daemon_config(fake.base_url))
        started = time.monotonic()
        assert await running.result(20) == EXIT_AUTH
        elapsed = time.monotonic() - started
        assert running.daemon is not None
        refused = sum(
            running.daemon.registry.value(API_REQUESTS, endpoint=e, status=401) for e in ENDPOINTS
        )
        assert fake.state.stats.creates_accepted == 0
    assert refused == 1  # one create, refused, never retried
    assert elapsed < 5
    rows = task_rows(db_path)
    assert {(status, attempts) for status, attempts, _ in rows.values()} == {("pending", 0)}


async def test_a_key_refused_while_only_polling_also_stops_with_exit_78(
    store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await enqueue(store, 4)
    fake_config = FakeApiConfig(api_key="the-right-key", processing_seconds=30.0)
    async with FakeApiServer(fake_config) as fake:
        config = daemon_config(fake.base_url)
        first = Running(config, api_key="the-right-key")
        await wait_for(lambda: _at_least_in_progress(db_path, 1), 20, "a batch in flight")
        assert first.daemon is not None
        first.daemon.stop()
        assert await first.result(20) == 0

        second = Running(config, api_key="a-revoked-key")  # nothing pending: only polls
        assert await second.result(20) == EXIT_AUTH
        assert second.daemon is not None
        refused = sum(
            second.daemon.registry.value(API_REQUESTS, endpoint=e, status=401) for e in ENDPOINTS
        )
    assert refused == 1
    assert batches_in(db_path, "in_progress") == 1  # left for a restart with a good key


async def test_a_batch_that_disappears_is_reported_lost_and_its_tasks_sent_again(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    ids = await enqueue(store, 4)
    fake_api.state.timeline = Timeline(processing_seconds=30.0)
    config = daemon_config(fake_api.base_url)  # not_found_grace_s = 1.0
    running = Running(config)
    await wait_for(lambda: _at_least_in_progress(db_path, 1), 20, "a batch in flight")
    # The fake refuses to delete a batch in progress; the real API can still lose one.
    [gone] = list(fake_api.state.batches)
    del fake_api.state.batches[gone]
    fake_api.state.timeline = Timeline(processing_seconds=0.2)

    assert await running.result(30) == 0
    with sqlite3.connect(db_path) as db:
        lost = db.execute("SELECT api_batch_id, note FROM batches WHERE state = 'lost'").fetchall()
    assert lost == [(gone, "404 on retrieve")]
    rows = task_rows(db_path)
    assert {rows[cid][:2] for cid in ids} == {("succeeded", 2)}  # the lost one may be billed
    assert all(fake_api.state.stats.submissions[cid] == 2 for cid in ids)


async def test_transient_404s_right_after_create_are_tolerated(
    store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await enqueue(store, 8)
    faults = FaultConfig(not_found_after_create_seconds=0.6)  # shorter than the 1 s grace
    async with FakeApiServer(FakeApiConfig(processing_seconds=0.8, faults=faults)) as fake:
        config = daemon_config(fake.base_url, max_requests=4)
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
        assert fake.faults.injected["not_found_after_create"] > 0
        assert_all_succeeded_once(db_path, fake)
    assert batches_in(db_path, "lost") == 0


async def test_a_400_naming_one_request_marks_only_that_task_and_sends_the_rest(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fake rejects these two ids the way the API rejects a request, naming its index.
    refused = {"refused-1", "refused-2"}
    refuse_in_fake(
        monkeypatch,
        refused,
        lambda index: f"requests.{index}.custom_id: refused by a rule the client cannot know",
    )
    ids = await enqueue(store, 6)
    await store.enqueue((cid, request_params(f"bad {cid}")) for cid in sorted(refused))
    config = daemon_config(fake_api.base_url, max_requests=10)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0

    rows = task_rows(db_path)
    for cid in refused:
        status, attempts, error = rows[cid]
        assert (status, attempts) == ("invalid", 0)
        assert error is not None
        assert "refused by the API" in error
        assert "custom_id: refused by a rule" in error
    assert {rows[cid][:2] for cid in ids} == {("succeeded", 1)}
    assert all(fake_api.state.stats.submissions[cid] == 1 for cid in ids)
    assert fake_api.state.stats.creates_accepted == 1


async def test_a_results_stream_cut_midway_is_fetched_again_and_rewriting_is_harmless(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await enqueue(store, 10)
    fake_api.faults.config = FaultConfig(results_truncate_rate=1.0)
    config = daemon_config(fake_api.base_url, max_requests=10)
    running = Running(replace(config, results=replace(config.results, chunk_size=2)))
    await wait_for(lambda: _truncations(fake_api, 3), 20, "three cut-off downloads")
    # Each cut-off download wrote its first chunks; the tasks stay waiting, none failed.
    rows = task_rows(db_path)
    assert {status for status, _, _ in rows.values()} <= {"submitted", "succeeded"}
    fake_api.faults.config = FaultConfig()

    assert await running.result(20) == 0
    assert_all_succeeded_once(db_path, fake_api)
    assert running.daemon is not None
    ignored = running.daemon.registry.value(RESULTS_WRITTEN, outcome="ignored")
    written = running.daemon.registry.value(RESULTS_WRITTEN, outcome="written")
    assert written == 10
    assert ignored >= 4  # lines written before a cut were met again and left alone


async def _truncations(fake: FakeApiServer, count: int) -> bool:
    return fake.faults.injected["truncate"] >= count
