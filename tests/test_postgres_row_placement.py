"""Where PostgreSQL puts new tasks and their claims (migration 012, tasks' fillfactor).

A history of finished tasks packed full leaves on each page a hole that holds one pending
row and no more. Without a reserve, the free space map offers those pages to every new
task and to every claim's new row version (a claim changes the indexed `status`: never a
HOT update), one row per old page: at 2,000,000 finished rows that was 2.2x the time of a
fresh database (bench/README.md, "PostgreSQL: where new rows land"). With 012's reserve a
hole must hold a row plus 5% of a page, so new rows fill new pages together.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import open_store
from batchd.store.postgres.connection import quote_ident
from batchd.store.postgres.migrations import shipped_migrations
from tests.support.backends import PostgresPeek

pytestmark = pytest.mark.postgres

HISTORY = 400  # finished tasks: 100 pages of four, each with a ~760 B hole
NEW = 200
# A pending task's params as bench/scale.py's (~430 B of jsonb: the row is ~0.5 KB).
NEW_PARAMS = json.dumps(
    {
        "model": "claude-haiku-4-5-20251001",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Summarise these notes. " + "n" * 277}],
    }
)
# Finished rows shaped as bench/pgscale.py's history (~1.85 KB each).
_HISTORY_ROWS = """
INSERT INTO tasks (custom_id, params, status, attempts, result, model, input_tokens,
    output_tokens, cache_creation_input_tokens, cache_read_input_tokens, submitted_at,
    completed_at)
SELECT 'hist-' || lpad(n::text, 9, '0'), ?::jsonb, 'succeeded', 1,
    jsonb_build_object('type', 'succeeded', 'message', jsonb_build_object(
        'id', 'msg_' || lpad(n::text, 24, '0'), 'type', 'message', 'role', 'assistant',
        'model', 'claude-haiku-4-5-20251001', 'content', jsonb_build_array(
            jsonb_build_object('type', 'text', 'text', left(repeat(md5(n::text) || ' ', 28), 900))),
        'stop_reason', 'end_turn', 'stop_sequence', NULL, 'usage', jsonb_build_object(
            'input_tokens', 90, 'output_tokens', 200))),
    'claude-haiku-4-5-20251001', 90, 200, 0, 0, now() - interval '2 days',
    now() - interval '2 days'
FROM generate_series(1, ?::int) AS n"""
_PAGES = "SELECT pg_relation_size('tasks') / current_setting('block_size')::bigint"
_PAGE_OF = "(ctid::text::point)[0]::bigint"


async def migrated(postgres_database: DatabaseConfig) -> None:
    await (await open_store(postgres_database)).close()


async def apply_012_again(postgres_database: DatabaseConfig) -> None:
    """Migration 012's own script, run again on the migrated schema (as a rerun would)."""
    (script,) = [m.script for m in shipped_migrations() if m.name == "tasks_fillfactor"]
    assert postgres_database.url is not None
    assert postgres_database.schema is not None
    conn = await asyncpg.connect(
        postgres_database.url,
        server_settings={"search_path": quote_ident(postgres_database.schema)},
    )
    try:
        await conn.execute(script)
    finally:
        await conn.close()


def fillfactor(postgres_peek: PostgresPeek) -> list[tuple[object, ...]]:
    return postgres_peek.query("SELECT reloptions FROM pg_class WHERE oid = 'tasks'::regclass")


async def test_tasks_keeps_a_reserve_on_each_page_and_012_applies_again(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    await migrated(postgres_database)
    assert fillfactor(postgres_peek) == [(["fillfactor=95"],)]
    await apply_012_again(postgres_database)
    assert fillfactor(postgres_peek) == [(["fillfactor=95"],)]


async def test_new_tasks_and_their_claims_fill_new_pages_not_the_historys_holes(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    await migrated(postgres_database)
    # The history as a batchd before 012 wrote it: pages packed full, each hole recorded
    # in the free space map by VACUUM.
    postgres_peek.execute("ALTER TABLE tasks RESET (fillfactor)")
    postgres_peek.execute(_HISTORY_ROWS, NEW_PARAMS, HISTORY)
    postgres_peek.execute("VACUUM tasks")
    ((history_pages,),) = postgres_peek.query(_PAGES)
    assert history_pages == HISTORY // 4
    # The control: without the reserve, a new task's row goes into an old page's hole.
    postgres_peek.execute(
        "INSERT INTO tasks (custom_id, params) VALUES ('probe', ?::jsonb)", NEW_PARAMS
    )
    ((probe_page,),) = postgres_peek.query(
        f"SELECT {_PAGE_OF} FROM tasks WHERE custom_id = 'probe'"
    )
    assert probe_page < history_pages
    postgres_peek.execute("DELETE FROM tasks WHERE custom_id = 'probe'")
    postgres_peek.execute("VACUUM tasks")  # the hole is offered again

    await apply_012_again(postgres_database)
    store = await open_store(postgres_database)
    try:
        report = await store.enqueue((f"new-{n:04d}", NEW_PARAMS) for n in range(NEW))
        assert report.inserted == NEW
        pending = postgres_peek.query(f"SELECT {_PAGE_OF} FROM tasks WHERE status = 'pending'")
        ids = [task.id async for task in store.iter_pending()]
        assert len(ids) == NEW
        assert await store.record_intent(ids, 1000) is not None
    finally:
        await store.close()
    claimed = postgres_peek.query(f"SELECT {_PAGE_OF} FROM tasks WHERE status = 'submitted'")
    assert len(claimed) == NEW
    pending_pages = {page for (page,) in pending}
    for name, pages in (("new tasks", pending), ("claims", claimed)):
        numbers = {page for (page,) in pages}
        assert min(numbers) >= history_pages, f"{name} landed in the history's holes"
        # ~14 rows of ~0.5 KB a page: together, not one a page (NEW pages before 012). A
        # claim's new row version may also stay on its own page, where the reserve left
        # under the new tasks holds one (an UPDATE keeps a page's room for itself).
        elsewhere = numbers - pending_pages if name == "claims" else numbers
        assert len(elsewhere) <= NEW // 8, f"{name} on {len(elsewhere)} new pages"
