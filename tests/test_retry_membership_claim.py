"""A claim takes a task only as it was read: the body was built from that row's params.

A user's UPDATE of a pending task's params (both stores), or on SQLite a DELETE and a new
INSERT that reuses the deleted row's id, between the chunker's read (`iter_pending`) and
the claim (`record_intent`) makes the claim fail: nothing is sent from the old params, and
the next read builds the body from the new ones (review 7, finding 6). Real SQLite files
and a real PostgreSQL schema per test, no mocks.
"""

from __future__ import annotations

import pytest

from batchd.domain import PendingTask
from batchd.pipeline.chunker import build_chunk
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.params import request_params
from tests.support.store import PARAMS, add_tasks

pytestmark = pytest.mark.both_stores
CORRECTED = (
    '{"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "y"}]}'
)


async def read(store: Store) -> list[PendingTask]:
    return [task async for task in store.iter_pending()]


def claim_args(tasks: list[PendingTask]) -> tuple[list[int], int, list[str]]:
    return [t.id for t in tasks], 1000, [t.version for t in tasks]


async def test_a_task_whose_params_changed_after_the_read_is_not_claimed(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    seen = await read(store)
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'b'", CORRECTED)

    assert await store.record_intent(*claim_args(seen)) is None
    assert [row[0] for row in peek.query("SELECT status FROM tasks")] == ["pending", "pending"]

    # Read again: the body is built from the corrected params, and that claim holds.
    again = await read(store)
    assert [t.custom_id for t in again] == ["a", "b"]
    assert '"content": "y"' in again[1].params
    local_id = await store.record_intent(*claim_args(again))
    assert local_id is not None
    assert peek.task("b")["batch_id"] == local_id
    # Edited again after this read: a later edit is caught as well (not only the first).
    await store.release_intent(local_id, "refused")
    third = await read(store)
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'b'", PARAMS)
    assert await store.record_intent(*claim_args(third)) is None


async def test_an_unchanged_task_is_claimed_and_an_update_of_other_columns_is_no_change(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a")
    seen = await read(store)
    # A write that leaves the request as it was: the same params text, another column.
    peek.execute("UPDATE tasks SET error = 'note' WHERE custom_id = 'a'")
    assert await store.record_intent(*claim_args(seen)) is not None


async def test_a_renamed_task_is_not_claimed_under_its_old_custom_id(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a")
    seen = await read(store)
    peek.execute("UPDATE tasks SET custom_id = 'a2' WHERE custom_id = 'a'")
    assert await store.record_intent(*claim_args(seen)) is None


@pytest.mark.sqlite_only
async def test_a_deleted_task_whose_id_a_new_row_reuses_is_not_claimed(
    store: Store, peek: Peek
) -> None:
    # SQLite gives a new row max(id) + 1: deleting the newest task and inserting its
    # corrected copy reuses its id. The original was created before the read (here long
    # before, so the test never depends on two inserts falling in one millisecond).
    await add_tasks(store, "a")
    peek.execute(
        "INSERT INTO tasks (custom_id, params, created_at) VALUES ('b', ?, ?)",
        PARAMS,
        "2020-01-01T00:00:00.000Z",
    )
    seen = await read(store)
    [(old_id,)] = peek.query("SELECT id FROM tasks WHERE custom_id = 'b'")
    peek.execute("DELETE FROM tasks WHERE custom_id = 'b'")
    peek.execute("INSERT INTO tasks (custom_id, params) VALUES ('b', ?)", CORRECTED)
    assert peek.query("SELECT id FROM tasks WHERE custom_id = 'b'") == [(old_id,)]

    assert await store.record_intent(*claim_args(seen)) is None
    assert peek.task("b")["status"] == "pending"
    assert await store.record_intent(*claim_args(await read(store))) is not None


async def test_the_chunker_keeps_each_tasks_version_for_the_claim(store: Store) -> None:
    report = await store.enqueue((cid, request_params(cid)) for cid in ("a", "b", "c"))
    assert report.inserted == 3
    chunk = await build_chunk(store.iter_pending(), max_requests=2, max_bytes=1_000_000)
    try:
        seen = await read(store)
        assert (chunk.task_ids, chunk.invalid) == ([t.id for t in seen[:2]], [])
        assert chunk.versions == [t.version for t in seen[:2]]
        assert all(chunk.versions)
        assert await store.record_intent(chunk.task_ids, chunk.body.size, chunk.versions)
    finally:
        chunk.body.close()
