"""The history database of `bench/scale.py` and `bench/flat.py reads` on PostgreSQL.

A schema of its own in the database `--database` names (the URL's role needs CREATE
there), built once with plain SQL (`generate_series`, no daemon, no Python per row) and
kept between runs: `batchd_scale_N` for N finished tasks. The tasks are shaped as the
SQLite build's (bench/scale.py): status `succeeded`, ~400-byte params, ~1.2 KB results,
completed two days ago, 10,000 per completed batch, with their batch_tasks links.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from batchd.config import DatabaseConfig
from batchd.store import open_store
from batchd.store.postgres.connection import quote_ident

_BATCH_ROWS = 10_000
_BUILD_STEP = 200_000  # tasks per INSERT: the count triggers' transition table stays small
MODEL = "claude-haiku-4-5-20251001"

# params and result as SQL of the row number `n`: the shapes of bench/common.py's
# params_json (a ~300-byte prompt naming the task) and bench/scale.py's result_json
# (~900 characters of text), built by the server.
_PARAMS = f"""jsonb_build_object('model', '{MODEL}', 'max_tokens', 200, 'messages',
    jsonb_build_array(jsonb_build_object('role', 'user', 'content',
        left('Task ' || n || ': summarise the following notes in one sentence. '
             || repeat(md5(n::text) || ' ', 8), 300))))"""
_RESULT = f"""jsonb_build_object('type', 'succeeded', 'message', jsonb_build_object(
    'id', 'msg_' || lpad(n::text, 24, '0'), 'type', 'message', 'role', 'assistant',
    'model', '{MODEL}', 'content', jsonb_build_array(jsonb_build_object('type', 'text',
    'text', left(repeat(md5(n::text) || ' ', 28), 900))), 'stop_reason', 'end_turn',
    'stop_sequence', NULL, 'usage', jsonb_build_object('input_tokens', 90,
    'output_tokens', 200)))"""


@dataclass(frozen=True)
class PgTarget:
    url: str
    schema: str

    def database(self) -> DatabaseConfig:
        return replace(DatabaseConfig(), url=self.url, schema=self.schema)

    def fresh(self, label: str) -> PgTarget:
        return PgTarget(self.url, f"{self.schema}_{label}")


def run(target: PgTarget, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        conn = await asyncpg.connect(
            target.url, server_settings={"search_path": quote_ident(target.schema)}
        )
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def migrate(target: PgTarget) -> None:
    async def main() -> None:
        await (await open_store(target.database())).close()

    asyncio.run(main())


def drop(target: PgTarget) -> None:
    run(
        target,
        lambda conn: conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(target.schema)} CASCADE"),
    )


def built(target: PgTarget) -> int | None:
    """How many history tasks the kept schema holds, None if it was never built whole."""

    async def read(conn: asyncpg.Connection) -> int | None:
        exists = await conn.fetchval("SELECT to_regclass('bench_scale_built') IS NOT NULL")
        return await conn.fetchval("SELECT history FROM bench_scale_built") if exists else None

    result: int | None = run(target, read)
    return result


def build(target: PgTarget, history: int) -> float:
    """The history schema, with the daemon's own schema (its migrations), filled by SQL."""
    started = time.perf_counter()
    drop(target)
    migrate(target)
    batches = (history + _BATCH_ROWS - 1) // _BATCH_ROWS

    async def fill(conn: asyncpg.Connection) -> None:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(
            "INSERT INTO batches (id, api_batch_id, state, request_count, body_bytes,"
            " intent_at, submitted_at, processing_status, ended_at, completed_at)"
            " OVERRIDING SYSTEM VALUE"
            " SELECT b, 'msgbatch_hist' || lpad(b::text, 8, '0'), 'completed',"
            " least($2, $1 - (b - 1) * $2), 0, t, t, 'ended', t, t"
            " FROM generate_series(1, $3) AS b, (SELECT now() - interval '2 days' AS t) AS c",
            history,
            _BATCH_ROWS,
            batches,
        )
        await conn.execute("SELECT setval(pg_get_serial_sequence('batches', 'id'), $1)", batches)
        for first in range(1, history + 1, _BUILD_STEP):
            last = min(first + _BUILD_STEP - 1, history)
            await conn.execute(
                "INSERT INTO tasks (id, custom_id, params, status, batch_id, attempts, result,"
                " model, input_tokens, output_tokens, cache_creation_input_tokens,"
                " cache_read_input_tokens, created_at, submitted_at, completed_at)"
                " OVERRIDING SYSTEM VALUE"
                f" SELECT n, 'hist-' || lpad(n::text, 9, '0'), {_PARAMS}, 'succeeded',"
                f" ((n - 1) / $3) + 1, 1, {_RESULT}, '{MODEL}', 90, 200, 0, 0, t, t, t"
                " FROM generate_series($1::bigint, $2::bigint) AS n,"
                " (SELECT now() - interval '2 days' AS t) AS c",
                first,
                last,
                _BATCH_ROWS,
            )
            await conn.execute(
                "INSERT INTO batch_tasks (batch_id, task_id)"
                " SELECT batch_id, id FROM tasks WHERE id BETWEEN $1 AND $2",
                first,
                last,
            )
            print(f"  built {last:,} of {history:,} rows", file=sys.stderr, end="\r")
        await conn.execute("SELECT setval(pg_get_serial_sequence('tasks', 'id'), $1)", history)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE batch_tasks")
        await conn.execute("VACUUM ANALYZE batches")
        await conn.execute("CREATE TABLE bench_scale_built (history bigint NOT NULL)")
        await conn.execute("INSERT INTO bench_scale_built VALUES ($1)", history)

    run(target, fill)
    return time.perf_counter() - started


def reset(target: PgTarget, history: int) -> None:
    """Drop what earlier runs added past the built history (then let autovacuum see it)."""
    batches = (history + _BATCH_ROWS - 1) // _BATCH_ROWS

    async def clean(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("DELETE FROM batch_tasks WHERE batch_id > $1", batches)
            await conn.execute("DELETE FROM tasks WHERE id > $1", history)
            await conn.execute("DELETE FROM batches WHERE id > $1", batches)
            await conn.execute("DELETE FROM unmatched_results")
            await conn.execute("DELETE FROM missing_results")
            await conn.execute("DELETE FROM batches_to_check")
        await conn.execute("VACUUM tasks")  # the index-only scans need the visibility map

    run(target, clean)


def add_tasks(target: PgTarget, count: int, prefix: str, *, old: bool) -> None:
    """`count` tasks past every other id: pending, or finished 400 days ago (prunable;
    no batch, so pruning them forgets none)."""
    finished = (
        f", 'succeeded', {_RESULT}, now() - interval '400 days'"
        if old
        else ", 'pending', NULL, NULL"
    )

    async def add(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO tasks (custom_id, params, status, result, completed_at)"
            f" SELECT $2 || lpad(n::text, 9, '0'), {_PARAMS}{finished}"
            " FROM generate_series(0, $1::bigint - 1) AS n",
            count,
            prefix,
        )
        await conn.execute("ANALYZE tasks")

    run(target, add)


def remove_added(target: PgTarget, prefix: str) -> None:
    async def remove(conn: asyncpg.Connection) -> None:
        # Past the history's ids (on the key), by prefix: no range of text, whose order
        # is the database's collation's.
        await conn.execute(
            "DELETE FROM tasks WHERE id > (SELECT history FROM bench_scale_built)"
            " AND starts_with(custom_id, $1)",
            prefix,
        )
        await conn.execute("VACUUM tasks")

    run(target, remove)


def result_rows(target: PgTarget) -> int:
    count: int = run(
        target, lambda conn: conn.fetchval("SELECT count(*) FROM tasks WHERE result IS NOT NULL")
    )
    return count


def max_id(target: PgTarget) -> int:
    found: int = run(target, lambda conn: conn.fetchval("SELECT coalesce(max(id), 0) FROM tasks"))
    return found


def size_mb(target: PgTarget) -> float:
    found: int = run(
        target,
        lambda conn: conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c"
            " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        ),
    )
    return int(found) / 1e6


def explain(target: PgTarget, sql: str, *params: Any) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement, rolled back: its plan, line by line."""

    async def plan(conn: asyncpg.Connection) -> list[str]:
        tx = conn.transaction()
        await tx.start()
        try:
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
        finally:
            await tx.rollback()
        return [row[0] for row in rows]

    lines: list[str] = run(target, plan)
    return lines
