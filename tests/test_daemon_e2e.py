"""The daemon end to end on each store (a real SQLite file, a real PostgreSQL database), the
fake API over loopback, no mocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store, StoreError, open_store
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek
from tests.support.params import request_params
from tests.support.waiting import eventually


def prompt(n: int) -> str:
    return f"Describe product number {n} in one line"


pytestmark = pytest.mark.both_stores


def final_rows(peek: Peek) -> dict[str, tuple[str, str | None, str | None, int]]:
    rows = peek.query("SELECT custom_id, status, result, error, attempts FROM tasks")
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def result_text(result_json: str) -> str:
    return str(orjson.loads(result_json)["message"]["content"][0]["text"])


async def run_until_idle(config: Config, timeout_s: float = 60.0) -> int:
    return await asyncio.wait_for(run_daemon(config, "test-key", exit_when_idle=True), timeout_s)


async def test_thousands_of_tasks_in_several_batches_each_result_on_its_own_task(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], peek: Peek
) -> None:
    report = await store.enqueue((f"task-{n}", request_params(prompt(n))) for n in range(3000))
    assert report.inserted == 3000
    await store.close()

    assert await run_until_idle(daemon_config(fake_api.base_url, max_requests=700)) == 0

    rows = final_rows(peek)
    assert len(rows) == 3000
    for custom_id, (status, result, error, attempts) in rows.items():
        n = int(custom_id.removeprefix("task-"))
        assert status == "succeeded", (custom_id, status, error)
        assert result is not None
        assert prompt(n) in result_text(result), custom_id  # never another task's answer
        assert attempts == 1
    batches = peek.query("SELECT request_count, state FROM batches ORDER BY id")
    usage = peek.query("SELECT min(input_tokens), min(output_tokens) FROM tasks")[0]
    assert [count for count, _ in batches] == [700, 700, 700, 700, 200]
    assert {state for _, state in batches} == {"completed"}
    assert usage[0] > 0
    assert usage[1] > 0


async def test_byte_limit_splits_batches_and_a_request_too_big_alone_is_invalid(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], peek: Peek
) -> None:
    padding = "x" * 900
    await store.enqueue((f"t-{n}", request_params(f"{prompt(n)} {padding}")) for n in range(60))
    await store.enqueue([("huge", request_params("y" * 30_000))])
    await store.close()

    max_bytes = 20_000
    assert await run_until_idle(daemon_config(fake_api.base_url, max_bytes=max_bytes)) == 0

    rows = final_rows(peek)
    assert rows["huge"][0] == "invalid"
    assert "at most 20000 bytes" in (rows["huge"][2] or "")
    assert all(rows[f"t-{n}"][0] == "succeeded" for n in range(60))
    sizes = [b for (b,) in peek.query("SELECT body_bytes FROM batches")]
    assert len(sizes) >= 3
    assert max(sizes) <= max_bytes


async def test_bad_rows_are_marked_invalid_with_a_reason_and_the_rest_go_on(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    peek: Peek,
    store_backend: str,
) -> None:
    await store.enqueue([("good-1", request_params("fine one")), ("good-2", request_params("two"))])
    bad = [
        ("not-object", "[1]"),
        ("no-model", '{"max_tokens": 5, "messages": [{"role":"user","content":"x"}]}'),
        ("streaming", request_params("s", stream=True)),
        ("bad id!", request_params("bad id")),
    ]
    if store_backend == "sqlite":  # PostgreSQL's jsonb refuses it at the user's INSERT
        bad.append(("not-json", "{oops"))
    # A user's own INSERTs, bypassing every check.
    peek.execute_each("INSERT INTO tasks (custom_id, params) VALUES (?, ?)", bad)
    await store.close()

    assert await run_until_idle(daemon_config(fake_api.base_url)) == 0

    rows = final_rows(peek)
    assert rows["good-1"][0] == rows["good-2"][0] == "succeeded"
    for custom_id, _ in bad:
        status, _, error, attempts = rows[custom_id]
        assert status == "invalid", custom_id
        assert error, custom_id
        assert attempts == 0  # never sent, never paid for


async def test_a_user_inserting_rows_while_the_daemon_runs_loses_nothing(
    fake_api: FakeApiServer, daemon_config: Callable[..., Config], peek: Peek
) -> None:
    config = daemon_config(fake_api.base_url, max_requests=50)
    await (await open_store(config.database)).close()

    def insert_slowly() -> None:
        peek.execute_each(
            "INSERT INTO tasks (custom_id, params) VALUES (?, ?)",
            [(f"live-{n}", request_params(prompt(n))) for n in range(400)],
        )

    started: list[Daemon] = []

    async def keep(daemon: Daemon) -> None:
        started.append(daemon)

    running = asyncio.create_task(run_daemon(config, "test-key", on_started=keep))
    await asyncio.to_thread(insert_slowly)
    opened = await open_store(config.database)
    try:
        await eventually(
            opened.status_counts, "400 tasks succeeded", 60, until=lambda c: c["succeeded"] == 400
        )
    finally:
        await opened.close()
    started[0].stop()
    assert await running == 0
    rows = final_rows(peek)
    assert len(rows) == 400
    assert {status for status, *_ in rows.values()} == {"succeeded"}
    assert all(
        prompt(int(k.removeprefix("live-"))) in result_text(r[1] or "") for k, r in rows.items()
    )


@pytest.mark.sqlite_only  # the fault is injected into the SQLite store's method
async def test_a_database_outage_during_the_idle_check_is_waited_out_not_fatal(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    peek: Peek,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--exit-when-idle` on a database that goes away for a moment (a PostgreSQL restart):
    the idle check waits it out like every other step, instead of ending the daemon with 1."""
    await store.enqueue((f"idle-{n}", request_params(prompt(n))) for n in range(20))
    await store.close()

    has_tasks = SqliteStore.has_tasks
    refusals = iter(range(3))

    async def unavailable_at_first(self: SqliteStore, *statuses: Any) -> bool:
        if next(refusals, None) is not None:
            raise _Unavailable("the database system is shutting down")
        return await has_tasks(self, *statuses)

    monkeypatch.setattr(SqliteStore, "has_tasks", unavailable_at_first)
    assert await run_until_idle(daemon_config(fake_api.base_url)) == 0
    assert {status for status, *_ in final_rows(peek).values()} == {"succeeded"}


class _Unavailable(StoreError):
    retryable = True
