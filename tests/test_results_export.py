"""`batchd results`: its lines byte for byte the API's JSONL shape whatever a custom_id or
a result holds, its pages whole and by id, and on PostgreSQL each page planned as a walk of
its status in `tasks_by_status`, in key order, whatever the statistics say (issue 16:
exports at 100,000 rows/s or more, never re-reading rows of other statuses).
"""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import orjson
import pytest

from batchd.cli.commands import export_results
from batchd.domain import TaskStatus
from batchd.store import Store
from batchd.store.postgres.store import PostgresStore
from tests.support.backends import Peek
from tests.support.plans import pool_statements
from tests.support.store import add_tasks, outcome, submitted_batch

ON_POSTGRESQL = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)

# custom_ids a user's INSERT may hold (the API's rule is checked at submission, not here):
# JSON escapes, control characters, non-ASCII, astral characters.
ODD_IDS = ["plain", 'quo"te', "back\\slash", "tab\tnew\nline", "ünï©ødé", "ctl\x01\x1f", "😀"]
RESULT = (
    '{"type": "succeeded", "message": {"content": [{"type": "text", "text": '
    '"a\\"b\\\\c\\n\\u0001 ünï 😀 \\ud83d\\ude00 </script>"}], "n": 1.50, "big": '
    '123456789012345678901234567890, "none": null, "list": [true, false, {}]}}'
)


def expected_lines(peek: Peek) -> bytes:
    """The export as `batchd results` wrote it before pages of bytes (one line per row:
    orjson's custom_id, the result's text as the database gives it back)."""
    rows = peek.query("SELECT custom_id, result FROM tasks WHERE result IS NOT NULL ORDER BY id")
    return b"".join(
        b'{"custom_id":' + orjson.dumps(cid) + b',"result":' + result.encode() + b"}\n"
        for cid, result in rows
    )


@pytest.mark.both_stores
async def test_export_lines_are_byte_for_byte_the_api_shape(store: Store, peek: Peek) -> None:
    local_id = await submitted_batch(store, "msgbatch_1", *ODD_IDS)
    lines = [replace(outcome(cid), result_json=RESULT) for cid in ODD_IDS[:-1]]
    lines.append(outcome(ODD_IDS[-1], "errored", error="boom"))
    await store.write_results(local_id, lines, max_attempts=1)
    await add_tasks(store, "still-pending")
    out = io.BytesIO()
    count = await export_results(store, out, list(TaskStatus))
    assert count == len(ODD_IDS)
    assert out.getvalue() == expected_lines(peek)
    parsed = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["custom_id"] for line in parsed] == ODD_IDS
    assert parsed[0]["result"] == orjson.loads(RESULT)
    assert parsed[-1]["result"] == {"type": "errored"}


@pytest.mark.both_stores
async def test_result_rows_come_by_id_in_lists_of_at_most_a_page_across_statuses(
    store: Store, peek: Peek
) -> None:
    ids = [f"r{n:02d}" for n in range(40)]
    await add_tasks(store, *ids)
    kinds = ["succeeded", "errored", "pending", "expired"]
    peek.execute_each(
        "UPDATE tasks SET status = ?, result = ? WHERE custom_id = ?",
        [
            (kind, f'{{"n": {n}}}', cid)
            for n, cid in enumerate(ids)
            if (kind := kinds[n % len(kinds)]) != "pending"
        ],
    )
    asked = [TaskStatus.SUCCEEDED, TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.PENDING]
    pages = [page async for page in store.iter_result_rows(asked, page_size=4)]
    assert all(0 < len(page) <= 4 for page in pages), [len(page) for page in pages]
    rows = [row for page in pages for row in page]
    assert [row[0] for row in rows] == sorted({row[0] for row in rows})  # by id, once each
    assert [(cid, orjson.loads(result)) for _, cid, result in rows] == [
        (cid, {"n": n}) for n, cid in enumerate(ids) if n % len(kinds) != 2
    ]
    assert all(isinstance(result, bytes) for _, _, result in rows)
    assert [page async for page in store.iter_result_rows([], page_size=4)] == []
    assert [page async for page in store.iter_result_rows([TaskStatus.CANCELED])] == []


@pytest.mark.both_stores
async def test_export_crosses_stretches_of_deleted_and_other_tasks(
    store: Store, peek: Peek
) -> None:
    """Results at both ends of 3,000 ids and one in the middle, pending tasks between
    and ids freed by deletes: every result once, in order."""
    ids = [f"s{n:04d}" for n in range(3000)]
    await add_tasks(store, *ids)
    peek.execute("DELETE FROM tasks WHERE custom_id > 's0002' AND custom_id < 's1500'")
    done = ["s0000", "s0001", "s1500", "s2999"]
    peek.execute_each(
        "UPDATE tasks SET status = 'succeeded', result = '{}' WHERE custom_id = ?",
        [(cid,) for cid in done],
    )
    pages = [page async for page in store.iter_result_rows(list(TaskStatus), page_size=10)]
    assert [cid for page in pages for _, cid, _ in page] == done


# -- PostgreSQL: each page's plan ------------------------------------------------------------


async def plans(
    store: PostgresStore, statements: list[tuple[str, Any]], generic: bool
) -> list[str]:
    """EXPLAIN of each statement on an export's own session (its settings), as planned for
    its arguments or (`generic`) as the cached plan of a prepared statement after five runs."""
    found = []
    async with store.database.key_order_sessions(1) as [conn]:
        if generic:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        for n, (sql, args) in enumerate(statements):
            await conn.execute(f"PREPARE page{n} AS {sql}")
            assert all(isinstance(arg, int) for arg in args), args  # the window's ids
            rows = await conn.fetch(f"EXPLAIN EXECUTE page{n}({', '.join(map(str, args))})")
            found.append("\n".join(row[0] for row in rows))
            await conn.execute(f"DEALLOCATE page{n}")
    return found


def window_statements(seen: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(sql, args) for sql, args in seen if "id <= $2" in sql]


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_export_windows_walk_the_primary_key_whatever_the_statistics_on_postgresql(
    store: Store, peek: Peek
) -> None:
    """Statistics taken when every task was pending, then 20,000 tasks finished (what a
    run leaves until autovacuum analyses). Each page of the export is a window of the
    primary key, its rows read once whatever their status: no sort, no scan of a status
    or of the table, for its arguments and as a cached (generic) plan."""
    assert isinstance(store, PostgresStore)
    peek.execute(
        "INSERT INTO tasks (custom_id, params) SELECT 'h' || n, '{}'"
        " FROM generate_series(1, 20000) AS n"
    )
    peek.execute("ANALYZE tasks")
    peek.execute(
        "UPDATE tasks SET status = CASE WHEN id % 10 = 0 THEN 'errored' ELSE 'succeeded' END,"
        ' result = \'{"type": "succeeded"}\' WHERE id <= 19000'
    )
    async with pool_statements(store) as seen:
        count = await export_results(store, io.BytesIO(), list(TaskStatus))
    assert count == 19_000
    windows = window_statements(seen)
    assert len(windows) == 20  # 1,000 ids each, first to last task of the statuses asked
    for generic in (False, True):
        for (sql, _), plan in zip(windows, await plans(store, windows, generic), strict=True):
            assert plan.startswith("Index Scan using tasks_pkey on tasks"), (sql, plan)
            assert "Sort" not in plan, (sql, plan)
            [cond] = [line for line in plan.splitlines() if "Index Cond" in line]
            assert "id >" in cond, (sql, plan)
            assert "id <=" in cond, (sql, plan)


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_export_jumps_over_ids_without_a_task_of_its_statuses_on_postgresql(
    store: Store, peek: Peek
) -> None:
    """100,000 ids freed by deletes between two results: a probe jumps them, instead of a
    hundred empty windows."""
    assert isinstance(store, PostgresStore)
    peek.execute(
        "INSERT INTO tasks (custom_id, params) SELECT 'g' || n, '{}'"
        " FROM generate_series(1, 100002) AS n"
    )
    peek.execute("DELETE FROM tasks WHERE custom_id NOT IN ('g1', 'g100002')")
    peek.execute("UPDATE tasks SET status = 'succeeded', result = '{}'")
    async with pool_statements(store) as seen:
        lines = [line async for line in store.iter_result_lines([TaskStatus.SUCCEEDED])]
    assert [line.custom_id for line in lines] == ["g1", "g100002"]
    assert len(window_statements(seen)) < 10  # 101 windows of 1,000 ids without the jump


@pytest.mark.both_stores
async def test_an_export_stopped_early_gives_its_connections_back(store: Store, peek: Peek) -> None:
    """Stopped after its first page with windows still in flight (PostgreSQL): the store
    exports again, whole, on the same pool."""
    await add_tasks(store, *[f"e{n:04d}" for n in range(3000)])
    peek.execute("UPDATE tasks SET status = 'succeeded', result = '{}'")
    pages = store.iter_result_rows([TaskStatus.SUCCEEDED], page_size=100)
    first = await anext(pages)
    assert len(first) == 100
    await pages.aclose()  # type: ignore[attr-defined]
    for _ in range(3):
        assert await export_results(store, io.BytesIO(), [TaskStatus.SUCCEEDED]) == 3000
