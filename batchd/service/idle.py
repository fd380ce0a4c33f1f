"""`--exit-when-idle`: whether every piece of work in the database is done.

Read from the database alone, so it is right on every daemon of a database: the leader
and standbys (PostgreSQL) all end once nothing is left for any of them.
"""

from __future__ import annotations

from datetime import datetime

from batchd.domain import BatchState, TaskStatus
from batchd.store import Store

_ACTIVE = (BatchState.CREATING, BatchState.IN_PROGRESS, BatchState.CANCELING, BatchState.ENDED)


async def all_work_done(store: Store, now: datetime) -> bool:
    """No task waiting, no batch in flight or to collect, no create's outcome still watched."""
    # Every 0.2 s: two index entries at most, never a count of every task.
    if await store.has_tasks(TaskStatus.PENDING, TaskStatus.SUBMITTED):
        return False
    if await store.batches_in(*_ACTIVE):
        return False
    # A create whose outcome was unknown may still land on the list: watched until then
    # (docs/design.md, step 4), since a batch found late saves paying its requests again.
    return not await store.watched_intents(now)
