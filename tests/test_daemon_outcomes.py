"""Per-request outcomes, retries, cancel and admission, end to end against the fake API."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson

from batchd.config import Config
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from tests.support.params import request_params
from tests.support.waiting import eventually

RETRYABLE_TYPES = ("api_error", "overloaded_error")


def rows(db_path: Path) -> list[tuple[str, str, str | None, str | None, int, str | None]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT custom_id, status, result, error, attempts, params FROM tasks"
        ).fetchall()


async def test_mixed_outcomes_are_handled_one_by_one_with_retries_and_kept_errors(
    store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    faults = FaultConfig(error_rate=0.3, retryable_error_share=0.5, expire_rate=0.1)
    fake_config = FakeApiConfig(
        processing_seconds=0.2,
        seed=3,
        faults=faults,
        models=("claude-haiku-4-5-20251001",),
    )
    await store.enqueue((f"t-{n}", request_params(f"question {n}")) for n in range(300))
    unknown_model = orjson.dumps(
        {"model": "claude-nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    ).decode()
    await store.enqueue([("bad-model", unknown_model)])
    await store.close()

    async with FakeApiServer(fake_config) as fake:
        config = daemon_config(fake.base_url, max_requests=100, max_attempts=3)
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 60) == 0

    by_id = {r[0]: r for r in rows(db_path)}
    statuses = {r[1] for r in by_id.values()}
    assert statuses <= {"succeeded", "errored", "expired"}, statuses
    _, status, result, error, attempts, _ = by_id["bad-model"]
    assert (status, attempts) == ("errored", 1)  # a client error ends at once
    assert error is not None
    assert "not_found_error" in error
    assert result is not None
    assert orjson.loads(result)["error"]["error"]["type"] == "not_found_error"

    retried = [r for r in by_id.values() if r[4] > 1]
    assert retried, "with 30% errors and 10% expiries some tasks must have been retried"
    for custom_id, status, result, error, attempts, _ in by_id.values():
        if status == "succeeded":
            assert result is not None
            text = orjson.loads(result)["message"]["content"][0]["text"]
            assert f"question {custom_id.removeprefix('t-')}" in text
        elif status == "expired" or any(t in (error or "") for t in RETRYABLE_TYPES):
            # Retryable failures end only when the attempts are used up, error kept.
            assert attempts == 3, (custom_id, status, error, attempts)
            assert error
        else:
            assert status == "errored"
            assert any(t in (error or "") for t in ("invalid_request_error", "not_found_error"))


async def test_canceling_every_task_of_a_batch_cancels_the_batch_on_the_api(
    store: Store, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await store.enqueue((f"c-{n}", request_params(f"slow {n}")) for n in range(5))
    fake_config = FakeApiConfig(processing_seconds=120, cancel_delay_seconds=0.2, seed=5)
    async with FakeApiServer(fake_config) as fake:
        config = daemon_config(fake.base_url)
        running = asyncio.create_task(run_daemon(config, "k", exit_when_idle=True))
        await eventually(
            store.status_counts, "5 tasks submitted", 30, until=lambda c: c["submitted"] == 5
        )
        await eventually(lambda: list(fake.state.batches), "the batch on the API", 10)
        report = await store.request_cancel([f"c-{n}" for n in range(5)])
        assert len(report.flagged) == 5
        assert await asyncio.wait_for(running, 30) == 0
        [batch] = fake.state.batches.values()
        assert batch.cancel_initiated_at is not None

    for custom_id, status, _, error, attempts, _ in rows(db_path):
        assert status == "canceled", custom_id
        assert attempts == 1
        assert error


async def test_admission_never_exceeds_the_in_flight_request_limit(
    store: Store, daemon_config: Callable[..., Config]
) -> None:
    await store.enqueue((f"a-{n}", request_params(f"q {n}")) for n in range(35))
    await store.close()
    async with FakeApiServer(FakeApiConfig(processing_seconds=0.3, seed=9)) as fake:
        config = daemon_config(fake.base_url, max_requests=10, max_in_flight_requests=10)
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 60) == 0
        timeline = fake.state.timeline
        spans = sorted(
            (batch.created_at, batch.end(timeline)[0], len(batch))
            for batch in fake.state.batches.values()
        )
    assert [size for *_, size in spans] == [10, 10, 10, 5]
    for (_, previous_end, _), (next_start, _, _) in itertools.pairwise(spans):
        assert next_start >= previous_end  # one batch of 10 in flight at a time


async def test_linger_sends_a_partly_full_batch_after_the_wait_not_before(
    store: Store, daemon_config: Callable[..., Config]
) -> None:
    await store.enqueue([("only-one", request_params("lonely"))])
    async with FakeApiServer(FakeApiConfig(processing_seconds=0.1, seed=2)) as fake:
        config = daemon_config(fake.base_url, max_requests=100)
        config = Config(
            database=config.database,
            api=config.api,
            polling=config.polling,
            batching=type(config.batching)(max_requests=100, linger_s=1.0),
        )
        started: list[Daemon] = []

        async def keep(daemon: Daemon) -> None:
            started.append(daemon)

        running = asyncio.create_task(run_daemon(config, "k", on_started=keep))
        await asyncio.sleep(0.5)
        assert not fake.state.batches  # still lingering for more tasks
        await eventually(lambda: list(fake.state.batches), "the batch after the linger", 10)
        assert len(fake.state.batches) == 1
        started[0].stop()
        assert await running == 0
