"""Databases as an older batchd left them, for tests that roll a schema back and migrate
it again: the statements that undo a migration, on either dialect.

Only migrations that cannot simply be applied again need undoing: 010 (indexes, IF NOT
EXISTS), 011 (a no-op on SQLite; PostgreSQL's replaces its own triggers) and 012 (a
fillfactor set again) can; 009's, 014's and 016's ADD COLUMNs and 015's table cannot
(016's trigger names its column: dropped first, in each dialect's syntax).
"""

from __future__ import annotations

# 009_collect_lease: the collection lease's columns.
UNDO_COLLECT_LEASE: tuple[str, ...] = tuple(
    f"ALTER TABLE batches DROP COLUMN {column}"
    for column in ("collector", "collect_lease_until", "next_poll_at")
)

# 014_collector_liveness: whether a lease's holder held its liveness lock.
UNDO_COLLECTOR_LIVENESS: tuple[str, ...] = ("ALTER TABLE batches DROP COLUMN collector_lock_held",)

# 015_kept_line_usage: the usage of billed lines no task holds (its trigger goes with it).
UNDO_KEPT_LINE_USAGE: tuple[str, ...] = ("DROP TABLE kept_line_usage",)

# 016_task_revision: tasks.revision and the trigger that moves it on.
UNDO_TASK_REVISION: tuple[str, ...] = (
    "DROP TRIGGER IF EXISTS tasks_revised",
    "ALTER TABLE tasks DROP COLUMN revision",
)
UNDO_TASK_REVISION_POSTGRESQL: tuple[str, ...] = (
    "DROP TRIGGER IF EXISTS tasks_revised ON tasks",
    "DROP FUNCTION IF EXISTS batchd_tasks_revised()",
    "ALTER TABLE tasks DROP COLUMN revision",
)

# 008_duplicate_acknowledged, and everything after it that must be undone (SQLite).
UNDO_FROM_ACKNOWLEDGED: tuple[str, ...] = (
    *UNDO_TASK_REVISION,
    *UNDO_KEPT_LINE_USAGE,
    *UNDO_COLLECTOR_LIVENESS,
    *UNDO_COLLECT_LEASE,
    "ALTER TABLE duplicate_batches DROP COLUMN acknowledged_at",
    "ALTER TABLE duplicate_batches DROP COLUMN acknowledged_note",
)
UNDO_FROM_ACKNOWLEDGED_POSTGRESQL: tuple[str, ...] = (
    *UNDO_TASK_REVISION_POSTGRESQL,
    *UNDO_FROM_ACKNOWLEDGED[len(UNDO_TASK_REVISION) :],
)

# 010_completion_indexes' partial index on batches.origin: SQLite refuses to drop an
# indexed column (PostgreSQL drops the index with it).
DROP_ORIGIN_INDEX = "DROP INDEX IF EXISTS batches_foreign"
