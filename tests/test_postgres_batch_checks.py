"""PostgreSQL's per-statement checks of the batches that tasks and batch_tasks name
(migration 011, instead of the foreign keys' per-row checks): what the foreign keys
refused is still refused, for users' writes as for batchd's, and what they allowed still
works: a claim, a requeue (batch_id NULL), a write-back, a prune of an emptied batch."""

from __future__ import annotations

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store, open_store
from tests.support.backends import PostgresPeek
from tests.support.store import add_tasks, api_batch, claim

pytestmark = pytest.mark.postgres


async def claimed(postgres_database: DatabaseConfig) -> int:
    """Tasks a, b, c; a and b claimed by a batch created on the API; its local id."""
    store: Store = await open_store(postgres_database)
    try:
        await add_tasks(store, "a", "b", "c")
        local_id = await claim(store, "a", "b")
        assert await store.mark_created(local_id, api_batch("msgbatch_1"))
    finally:
        await store.close()
    return local_id


def foreign_keys(postgres_peek: PostgresPeek) -> list[tuple[str, str]]:
    return postgres_peek.query(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint"
        " WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
        " AND conrelid IN ('tasks'::regclass, 'batch_tasks'::regclass) ORDER BY 1, 2"
    )


async def test_the_batch_columns_have_no_row_checks_left(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    await claimed(postgres_database)
    assert foreign_keys(postgres_peek) == []


async def test_a_task_or_link_naming_a_batch_that_does_not_exist_is_refused(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    local_id = await claimed(postgres_database)
    missing = local_id + 1000
    for sql, params in (
        ("UPDATE tasks SET batch_id = ? WHERE custom_id = 'c'", (missing,)),
        ("UPDATE tasks SET batch_id = ? WHERE custom_id IN ('a', 'c')", (missing,)),
        ("INSERT INTO tasks (custom_id, params, batch_id) VALUES ('d', '{}', ?)", (missing,)),
        ("INSERT INTO batch_tasks (batch_id, task_id) VALUES (?, 1)", (missing,)),
        ("UPDATE batch_tasks SET batch_id = ?", (missing,)),
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="names a batch"):
            postgres_peek.execute(sql, *params)
    # Nothing of those statements stayed.
    assert postgres_peek.query("SELECT custom_id, batch_id FROM tasks ORDER BY id") == [
        ("a", local_id),
        ("b", local_id),
        ("c", None),
    ]
    assert postgres_peek.query("SELECT batch_id, count(*) FROM batch_tasks GROUP BY 1") == [
        (local_id, 2)
    ]
    # What the foreign key allowed: an existing batch, or none.
    postgres_peek.execute("UPDATE tasks SET batch_id = ? WHERE custom_id = 'c'", local_id)
    postgres_peek.execute("UPDATE tasks SET batch_id = NULL WHERE custom_id = 'c'")


async def test_a_batch_still_named_cannot_be_deleted_an_emptied_one_can(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    local_id = await claimed(postgres_database)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="naming a deleted batch"):
        postgres_peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    postgres_peek.execute("DELETE FROM batch_tasks WHERE batch_id = ?", local_id)
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # the tasks still name it
        postgres_peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    postgres_peek.execute("UPDATE tasks SET batch_id = NULL, status = 'pending'")
    postgres_peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    assert postgres_peek.query("SELECT count(*) FROM batches") == [(0,)]
