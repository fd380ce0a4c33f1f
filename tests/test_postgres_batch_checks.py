"""PostgreSQL's per-statement checks of the batches that tasks and batch_tasks name
(migration 011, instead of the foreign keys' per-row checks): what the foreign keys
refused is still refused, for users' writes as for batchd's, and what they allowed still
works: a claim, a requeue (batch_id NULL), a write-back, a prune of an emptied batch."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store, open_store
from tests.support.backends import PostgresPeek
from tests.support.store import add_tasks, api_batch, claim

pytestmark = pytest.mark.postgres


@pytest.fixture
def database(postgres_dsn: str, postgres_schema: str) -> DatabaseConfig:
    return replace(DatabaseConfig(), url=postgres_dsn, schema=postgres_schema)


@pytest.fixture
def peek(database: DatabaseConfig) -> PostgresPeek:
    assert database.url is not None
    assert database.schema is not None
    return PostgresPeek(database.url, database.schema)


async def claimed(database: DatabaseConfig) -> int:
    """Tasks a, b, c; a and b claimed by a batch created on the API; its local id."""
    store: Store = await open_store(database)
    try:
        await add_tasks(store, "a", "b", "c")
        local_id = await claim(store, "a", "b")
        assert await store.mark_created(local_id, api_batch("msgbatch_1"))
    finally:
        await store.close()
    return local_id


def foreign_keys(peek: PostgresPeek) -> list[tuple[str, str]]:
    return peek.query(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint"
        " WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
        " AND conrelid IN ('tasks'::regclass, 'batch_tasks'::regclass) ORDER BY 1, 2"
    )


async def test_the_batch_columns_have_no_row_checks_left(
    database: DatabaseConfig, peek: PostgresPeek
) -> None:
    await claimed(database)
    assert foreign_keys(peek) == []


async def test_a_task_or_link_naming_a_batch_that_does_not_exist_is_refused(
    database: DatabaseConfig, peek: PostgresPeek
) -> None:
    local_id = await claimed(database)
    missing = local_id + 1000
    for sql, params in (
        ("UPDATE tasks SET batch_id = ? WHERE custom_id = 'c'", (missing,)),
        ("UPDATE tasks SET batch_id = ? WHERE custom_id IN ('a', 'c')", (missing,)),
        ("INSERT INTO tasks (custom_id, params, batch_id) VALUES ('d', '{}', ?)", (missing,)),
        ("INSERT INTO batch_tasks (batch_id, task_id) VALUES (?, 1)", (missing,)),
        ("UPDATE batch_tasks SET batch_id = ?", (missing,)),
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="names a batch"):
            peek.execute(sql, *params)
    # Nothing of those statements stayed.
    assert peek.query("SELECT custom_id, batch_id FROM tasks ORDER BY id") == [
        ("a", local_id),
        ("b", local_id),
        ("c", None),
    ]
    assert peek.query("SELECT batch_id, count(*) FROM batch_tasks GROUP BY 1") == [(local_id, 2)]
    # What the foreign key allowed: an existing batch, or none.
    peek.execute("UPDATE tasks SET batch_id = ? WHERE custom_id = 'c'", local_id)
    peek.execute("UPDATE tasks SET batch_id = NULL WHERE custom_id = 'c'")


async def test_a_batch_still_named_cannot_be_deleted_an_emptied_one_can(
    database: DatabaseConfig, peek: PostgresPeek
) -> None:
    local_id = await claimed(database)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="naming a deleted batch"):
        peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    peek.execute("DELETE FROM batch_tasks WHERE batch_id = ?", local_id)
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # the tasks still name it
        peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    peek.execute("UPDATE tasks SET batch_id = NULL, status = 'pending'")
    peek.execute("DELETE FROM batches WHERE id = ?", local_id)
    assert peek.query("SELECT count(*) FROM batches") == [(0,)]
