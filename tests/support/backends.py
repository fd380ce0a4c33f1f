"""Both stores behind one set of fixtures: `store_backend` names the database a test runs
on ("sqlite" unless a module parametrises it), `store` opens that store, `peek` reads its
tables as a user would (a connection of its own), `database_config` is its `[database]`.

A module runs its store tests on both with `pytestmark = pytest.mark.both_stores`; a test
of such a module that only means something on SQLite carries `sqlite_only` (SQLite's file,
pragmas, busy handler) and runs once.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store
from batchd.store.postgres.connection import PostgresTarget, quote_ident
from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore
from tests.support.postgres import run_sync

BOTH = ["sqlite", "postgresql"]
_PLACEHOLDER = re.compile(r"\?")


class Peek:
    """Reads a store's tables through a connection of its own, values as SQLite shows them
    (times as `...T..:..:..mmmZ` text, booleans as 0/1, sums as ints)."""

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def task(self, custom_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, sql: str, *params: Any) -> None:
        """A user's write (an INSERT, an UPDATE) in a transaction of its own."""
        self.execute_each(sql, [params])

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """A user's writes on one connection, each row in a transaction of its own."""
        raise NotImplementedError

    def execute_together(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """A bulk load: every row in one transaction (a history of many thousand tasks,
        where a commit per row cost PostgreSQL ~1.5 ms each)."""
        raise NotImplementedError


class SqlitePeek(Peek):
    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def task(self, custom_id: str) -> dict[str, Any]:
        conn = self._connect()
        try:
            found = conn.execute("SELECT * FROM tasks WHERE custom_id = ?", (custom_id,)).fetchone()
        finally:
            conn.close()
        assert found is not None, custom_id
        return dict(found)

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn = self._connect()
        try:
            for params in rows:
                with conn:
                    conn.execute(sql, params)
        finally:
            conn.close()

    def execute_together(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.executemany(sql, rows)
        finally:
            conn.close()


class PostgresPeek(Peek):
    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    def _run(
        self,
        sql: str,
        params: tuple[Any, ...],
        fetch: bool,
        rows: Sequence[Sequence[Any]] = (),
        together: bool = False,
    ) -> list[asyncpg.Record]:
        numbered = iter(range(1, 1000))
        sql = _PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql)

        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(
                self.dsn, server_settings={"search_path": quote_ident(self.schema)}
            )
            try:
                if fetch:
                    return list(await conn.fetch(sql, *params))
                if together:
                    async with conn.transaction():
                        await conn.executemany(sql, rows)
                    return []
                for row in rows:
                    await conn.execute(sql, *row)
                return []
            finally:
                await conn.close()

        result = run_sync(run)
        assert isinstance(result, list)
        return result

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return [tuple(_as_sqlite(value) for value in row) for row in self._run(sql, params, True)]

    def task(self, custom_id: str) -> dict[str, Any]:
        rows = self._run("SELECT * FROM tasks WHERE custom_id = ?", (custom_id,), True)
        assert rows, custom_id
        return {key: _as_sqlite(value) for key, value in rows[0].items()}

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._run(sql, (), False, rows)

    def execute_together(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._run(sql, (), False, rows, together=True)


def _as_sqlite(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        utc = value.astimezone(dt.UTC)
        return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return int(value)
    return value


# -- fixtures (registered through tests/conftest.py's pytest_plugins) ----------------------


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """The database this test runs on: "sqlite", unless the module parametrises it."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_config(
    request: pytest.FixtureRequest, store_backend: str, db_path: Path
) -> DatabaseConfig:
    """`[database]` for this test's store: the SQLite file, or the PostgreSQL database and
    a schema of this test's own."""
    if store_backend == "sqlite":
        return DatabaseConfig(path=db_path)
    dsn: str = request.getfixturevalue("postgres_dsn")
    schema: str = request.getfixturevalue("postgres_schema")
    return replace(DatabaseConfig(), url=dsn, schema=schema)


@pytest.fixture
async def store(
    database_config: DatabaseConfig, store_clock: Callable[[], dt.datetime] | None
) -> AsyncIterator[Store]:
    opened: Store
    if database_config.url is None:
        opened = await SqliteStore.open(database_config.path, clock=store_clock)
    else:
        target = PostgresTarget(database_config.url, database_config.schema)
        opened = await PostgresStore.open(target, clock=store_clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def peek(database_config: DatabaseConfig) -> Peek:
    if database_config.url is None:
        return SqlitePeek(database_config.path)
    assert database_config.schema is not None
    return PostgresPeek(database_config.url, database_config.schema)


@pytest.fixture
def postgres_database(postgres_dsn: str, postgres_schema: str) -> DatabaseConfig:
    """`[database]` on the session's PostgreSQL server, in a schema of this test's own: for
    modules that run on PostgreSQL alone."""
    return replace(DatabaseConfig(), url=postgres_dsn, schema=postgres_schema)


@pytest.fixture
def postgres_peek(postgres_database: DatabaseConfig) -> PostgresPeek:
    assert postgres_database.url is not None
    assert postgres_database.schema is not None
    return PostgresPeek(postgres_database.url, postgres_database.schema)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a `both_stores` module that use the store run on each backend, except the
    `sqlite_only` ones (SQLite's file, pragmas or busy handler: nothing to run elsewhere)."""
    if "store_backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("both_stores") is None:
        return
    if metafunc.definition.get_closest_marker("sqlite_only") is not None:
        return
    backends = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]
    metafunc.parametrize("store_backend", backends, indirect=True)
