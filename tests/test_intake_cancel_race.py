"""Review 7 finding 8: `cancel --all` meets every task that was waiting when it began, even
one the daemon moves between pending and submitted while the cancel walks the queue.

The walk goes by id, a range per transaction; the daemon (another store on the same
database) requeues and claims tasks between two of those transactions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from batchd.config import DatabaseConfig
from batchd.domain import TaskStatus
from batchd.store import Store, open_store
from batchd.store.postgres import actions as postgres_actions
from batchd.store.rows import USER_CANCELED
from batchd.store.sqlite import actions as sqlite_actions
from tests.support.backends import Peek
from tests.support.store import add_tasks, claim

pytestmark = pytest.mark.both_stores


def after_first_chunk(
    store: Store, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Awaitable[object]]
) -> None:
    """Run `meanwhile` once, right after the cancel's first transaction committed."""
    commits: list[int] = []
    transact = store.database.transact  # type: ignore[attr-defined]

    async def counted(body: Any, *args: Any, **kwargs: Any) -> Any:
        result = await transact(body, *args, **kwargs)
        commits.append(1)
        if len(commits) == 1:
            await meanwhile()
        return result

    monkeypatch.setattr(store.database, "transact", counted)  # type: ignore[attr-defined]


async def test_cancel_all_meets_a_task_requeued_and_one_claimed_while_it_runs(
    store: Store, database_config: DatabaseConfig, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_actions, "CANCEL_CHUNK", 3)
    monkeypatch.setattr(postgres_actions, "CANCEL_CHUNK", 3)
    names = [f"t-{n}" for n in range(10)]
    await add_tasks(store, *names)
    first = await claim(store, "t-0")  # submitted when the cancel begins, in the 1st range
    daemon = await open_store(database_config)

    async def daemon_moves_tasks() -> None:
        # Its create was refused: t-0 goes back to pending (behind the walk, which has
        # passed its id). And t-8, still ahead of the walk, is claimed into a new batch.
        await daemon.release_intent(first, "create refused: HTTP 500")
        await claim(daemon, "t-8")

    try:
        after_first_chunk(store, monkeypatch, daemon_moves_tasks)
        report = await store.cancel_waiting([TaskStatus.PENDING, TaskStatus.SUBMITTED])
    finally:
        await daemon.close()
    waiting = peek.query(
        "SELECT custom_id, status, cancel_requested FROM tasks"
        " WHERE status IN ('pending', 'submitted') ORDER BY id"
    )
    # t-8 is in a batch now: flagged, canceled when its result comes back. Nothing else
    # waits: t-0 was flagged in the first range and canceled when its batch was released.
    assert waiting == [("t-8", "submitted", 1)]
    assert peek.task("t-0")["status"] == "canceled"
    assert peek.task("t-0")["error"] == USER_CANCELED
    assert (report.canceled, report.flagged) == (8, 2)
    # The kept counts moved with it (PostgreSQL: one UPDATE both cancels and flags).
    counted = {status: n for status, n in (await store.status_counts()).items() if n}
    actual = dict(peek.query("SELECT status, count(*) FROM tasks GROUP BY status"))
    assert counted == actual == {"canceled": 9, "submitted": 1}


async def test_cancel_of_submitted_only_flags_a_task_requeued_behind_the_walk_too(
    store: Store, database_config: DatabaseConfig, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--status submitted`: the flag set in the first range outlives the requeue (the
    task ends canceled, not pending); pending tasks are left alone."""
    monkeypatch.setattr(sqlite_actions, "CANCEL_CHUNK", 2)
    monkeypatch.setattr(postgres_actions, "CANCEL_CHUNK", 2)
    await add_tasks(store, *(f"s-{n}" for n in range(6)))
    first = await claim(store, "s-0", "s-1", "s-2")
    daemon = await open_store(database_config)
    try:
        after_first_chunk(
            store,
            monkeypatch,
            lambda: daemon.release_intent(first, "create refused: HTTP 500"),
        )
        report = await store.cancel_waiting([TaskStatus.SUBMITTED])
    finally:
        await daemon.close()
    statuses = peek.query("SELECT custom_id, status FROM tasks ORDER BY id")
    # s-0 and s-1 were flagged in the first range, then their batch released: canceled.
    # s-2 was requeued before the walk reached it: pending, as the other pending ones.
    assert statuses == [
        ("s-0", "canceled"),
        ("s-1", "canceled"),
        ("s-2", "pending"),
        ("s-3", "pending"),
        ("s-4", "pending"),
        ("s-5", "pending"),
    ]
    assert (report.canceled, report.flagged) == (0, 2)
