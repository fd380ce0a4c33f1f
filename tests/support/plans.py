"""The statements a store runs, captured for EXPLAIN: SQLite's trace callback on both of
its connections, PostgreSQL's query logger on every connection of the pool."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore


@asynccontextmanager
async def sqlite_statements(store: SqliteStore) -> AsyncIterator[list[str]]:
    """Every statement the store runs on its reader and writer, bound values expanded."""
    seen: list[str] = []

    def keep(sql: str) -> None:
        if not sql.lstrip().startswith("--"):  # trigger bodies are reported as comments
            seen.append(sql)

    for conn in (store.database.reader, store.database.writer):
        await conn.set_trace_callback(keep)
    try:
        yield seen
    finally:
        for conn in (store.database.reader, store.database.writer):
            await conn.set_trace_callback(None)


def sqlite_plans(db_path: Path, seen: list[str]) -> list[tuple[str, list[str]]]:
    """(statement, its EXPLAIN QUERY PLAN steps) of each statement but BEGIN/COMMIT."""
    found = []
    with sqlite3.connect(db_path) as conn:
        for sql in seen:
            if sql.split()[0].upper() in {"BEGIN", "COMMIT", "ROLLBACK"}:
                continue
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            found.append((sql, [row[3] for row in rows]))
    conn.close()
    return found


@asynccontextmanager
async def pool_statements(store: PostgresStore) -> AsyncIterator[list[tuple[str, Any]]]:
    """Every statement the store's pool runs, with its arguments (asyncpg's query logger on
    each of the pool's connections: the pool opens all of them at start)."""
    seen: list[tuple[str, Any]] = []

    def keep(record: Any) -> None:
        seen.append((record.query, record.args))

    pool = store.database._pool
    held = [await pool.acquire() for _ in range(pool.get_size())]
    for conn in held:
        conn.add_query_logger(keep)
    for conn in held:
        await pool.release(conn)
    try:
        yield seen
    finally:
        held = [await pool.acquire() for _ in range(pool.get_size())]
        for conn in held:
            conn.remove_query_logger(keep)
        for conn in held:
            await pool.release(conn)
