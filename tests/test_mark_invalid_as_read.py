"""A task is marked invalid only as it was read: the reason is about the params judged.

The chunker (a request it cannot send), the budget (one whose bound alone passes the
limit) and a refused create read a pending row, judge it, then call `mark_invalid`. A
user's UPDATE of its params or custom_id between the two (or, on SQLite, a DELETE and an
INSERT that reuses its id) leaves it pending, judged again at the next read, as the claim
(`record_intent`, tests/test_retry_membership_claim.py) does. Real SQLite files and a real
PostgreSQL schema per test, no mocks.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from batchd.config import BudgetConfig, BudgetSettings, Config
from batchd.domain import PendingTask
from batchd.money.budget import BudgetGate
from batchd.pipeline.chunker import build_chunk
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.params import request_params
from tests.support.store import PARAMS, add_tasks, claim

pytestmark = pytest.mark.both_stores
NO_MODEL = '{"max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}'


async def read(store: Store) -> list[PendingTask]:
    return [task async for task in store.iter_pending()]


def judged(tasks: list[PendingTask], reason: str) -> tuple[list[tuple[int, str]], list[str]]:
    return [(t.id, reason) for t in tasks], [t.version for t in tasks]


async def test_a_task_whose_params_changed_after_the_read_stays_pending(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    seen = await read(store)
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'b'", request_params("fixed"))

    assert await store.mark_invalid(*judged(seen, "no model")) == 1
    assert peek.task("a")["status"] == "invalid"
    assert (peek.task("b")["status"], peek.task("b")["error"]) == ("pending", None)

    # Judged again from the row as it is now: a reason about those params marks it.
    again = await read(store)
    assert [t.custom_id for t in again] == ["b"]
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'b'", PARAMS)
    assert await store.mark_invalid(*judged(again, "edited twice")) == 0  # a later edit too
    third = await read(store)
    assert await store.mark_invalid(*judged(third, "no messages")) == 1
    assert (peek.task("b")["status"], peek.task("b")["error"]) == ("invalid", "no messages")


async def test_an_unchanged_task_is_marked_and_an_update_of_other_columns_is_no_change(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a")
    seen = await read(store)
    peek.execute("UPDATE tasks SET error = 'note' WHERE custom_id = 'a'")
    assert await store.mark_invalid(*judged(seen, "too large")) == 1
    assert peek.task("a")["error"] == "too large"


async def test_a_renamed_task_is_not_marked_under_its_old_custom_id(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a")
    seen = await read(store)
    peek.execute("UPDATE tasks SET custom_id = 'a2' WHERE custom_id = 'a'")
    assert await store.mark_invalid(*judged(seen, "bad custom_id")) == 0
    assert peek.task("a2")["status"] == "pending"


@pytest.mark.sqlite_only
async def test_a_deleted_task_whose_id_a_new_row_reuses_is_not_marked(
    store: Store, peek: Peek
) -> None:
    # As in the claim's test: the original created long before the read, its corrected
    # copy inserted after it on the same id (SQLite gives max(id) + 1).
    await add_tasks(store, "a")
    peek.execute(
        "INSERT INTO tasks (custom_id, params, created_at) VALUES ('b', ?, ?)",
        NO_MODEL,
        "2020-01-01T00:00:00.000Z",
    )
    seen = await read(store)
    [(old_id,)] = peek.query("SELECT id FROM tasks WHERE custom_id = 'b'")
    peek.execute("DELETE FROM tasks WHERE custom_id = 'b'")
    peek.execute("INSERT INTO tasks (custom_id, params) VALUES ('b', ?)", PARAMS)
    assert peek.query("SELECT id FROM tasks WHERE custom_id = 'b'") == [(old_id,)]

    assert await store.mark_invalid(*judged(seen[1:], "no model")) == 0
    assert peek.task("b")["status"] == "pending"


async def test_a_row_the_chunker_refused_and_the_user_then_fixed_stays_pending(
    store: Store, peek: Peek
) -> None:
    await store.enqueue([("ok", request_params("fine")), ("fixme", NO_MODEL)])
    chunk = await build_chunk(store.iter_pending(), max_requests=10, max_bytes=1_000_000)
    try:
        [(bad_id, reason)] = chunk.invalid
        assert "model" in reason
        assert chunk.invalid_versions == [t.version for t in await read(store) if t.id == bad_id]
        peek.execute(
            "UPDATE tasks SET params = ? WHERE custom_id = 'fixme'", request_params("fixed")
        )
        # What the submitter does with the chunk's refusals (submitter._next_chunk).
        assert await store.mark_invalid(chunk.invalid, chunk.invalid_versions) == 0
    finally:
        chunk.body.close()
    assert (peek.task("fixme")["status"], peek.task("fixme")["error"]) == ("pending", None)
    assert [t.custom_id for t in await read(store)] == ["ok", "fixme"]


async def test_the_budget_marks_a_task_over_the_limit_only_as_it_was_read(
    store: Store, peek: Peek
) -> None:
    # max_tokens 10^12: $2.5M at batch prices, against a budget of $1 (tests/test_budget.py).
    huge = request_params("x", max_tokens=10**12, model="claude-haiku-4-5")
    await store.enqueue([("huge", huge), ("ok", request_params("fine", max_tokens=10))])
    settings = BudgetSettings.of(replace(Config(), budget=BudgetConfig(1.0, "total")))
    assert settings is not None
    gate = BudgetGate(store, settings, clock=lambda: datetime(2026, 11, 24, tzinfo=UTC))
    seen = await read(store)
    ids, custom_ids = [t.id for t in seen], [t.custom_id for t in seen]
    stale = [t.version for t in seen]
    # Edited after the chunker read it (still over the limit): not marked for the old read.
    peek.execute(
        "UPDATE tasks SET params = ? WHERE custom_id = 'huge'",
        request_params("y", max_tokens=10**12, model="claude-haiku-4-5"),
    )
    admission = await gate.admit(ids, custom_ids, stale)
    assert admission.refused == 1  # judged over the limit: not sent in this batch
    assert peek.task("huge")["status"] == "pending"
    # Read again: the row as it is now is judged, and marked.
    again = await read(store)
    await gate.admit(
        [t.id for t in again], [t.custom_id for t in again], [t.version for t in again]
    )
    assert peek.task("huge")["status"] == "invalid"


async def test_a_refused_create_does_not_mark_a_task_edited_since_its_claim(
    store: Store, peek: Peek
) -> None:
    # The API named "b" as the bad request of the create; the user had corrected it while
    # the create was in flight (the edit ended its membership of the intent, migration 016).
    await add_tasks(store, "a", "b", "c")
    local_id = await claim(store, "a", "b", "c")
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'b'", request_params("fixed"))
    await store.release_intent(local_id, "create refused: 400", [("b", "refused: bad")])
    assert (peek.task("b")["status"], peek.task("b")["error"]) == ("pending", None)
    assert peek.task("b")["attempts"] == 0
    assert [t.custom_id for t in await read(store)] == ["a", "b", "c"]
