-- batchd schema v7: how many tasks are in each status, kept as rows change, so that
-- `batchd status`, /metrics, /healthz and the progress display read 7 rows instead of
-- the whole tasks_by_status index (150-270 ms at 2,000,000 finished tasks, issue 16).
--
-- Triggers keep it, so every writer is counted, a user's INSERT, UPDATE and DELETE as
-- much as the daemon's, in the same transaction as the change. One limit: a user's
-- `INSERT OR REPLACE` over an existing row deletes that row without firing the DELETE
-- trigger unless the connection set `PRAGMA recursive_triggers = ON` (SQLite's rule), so
-- the replaced row stays counted. The daemon's own decisions (idle, anything pending)
-- never read these counts: they ask the tasks themselves (`has_tasks`).

CREATE TABLE task_counts (
    status  TEXT PRIMARY KEY,
    tasks   INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO task_counts (status, tasks)
SELECT s.value, (SELECT count(*) FROM tasks WHERE tasks.status = s.value)
FROM json_each('["pending", "submitted", "succeeded", "errored", "canceled", "expired",
                 "invalid"]') AS s;

CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks
BEGIN
    UPDATE task_counts SET tasks = tasks + 1 WHERE status = NEW.status;
END;

CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks
BEGIN
    UPDATE task_counts SET tasks = tasks - 1 WHERE status = OLD.status;
END;

-- Runs once per changed task (100,000 in one batch's write-back). Two statements on the
-- key: one `WHERE status IN (OLD.status, NEW.status)` cost 3.5x as much per row (0.29 s
-- against 0.08 s of CPU per 100,000 claimed tasks: `python3 bench/flat.py triggers`).
CREATE TRIGGER task_counts_update AFTER UPDATE OF status ON tasks
WHEN NEW.status IS NOT OLD.status
BEGIN
    UPDATE task_counts SET tasks = tasks - 1 WHERE status = OLD.status;
    UPDATE task_counts SET tasks = tasks + 1 WHERE status = NEW.status;
END;

-- completed_at joins the status index: `batchd prune` finds the tasks finished before its
-- cutoff from the index alone, instead of reading every finished row (4 GB at 2,000,000
-- tasks, ~12 s) to learn that it is recent. The entry is rewritten anyway when a task
-- finishes (its status changes in the same UPDATE), so the write-back pays nothing more.
DROP INDEX tasks_by_status;
CREATE INDEX tasks_by_status ON tasks (status, id, completed_at);

-- Batches that lost a task, for `batchd prune` to look at (forget_empty_batches), instead
-- of every link of every finished batch (2,000,000 links, 2.2 s per prune at 2M tasks).
-- A trigger fills it, so a user's DELETE counts too; every batch of an older database is
-- looked at once, at the first prune after this migration.
CREATE TABLE batches_to_check (
    batch_id  INTEGER PRIMARY KEY
);
INSERT INTO batches_to_check (batch_id) SELECT id FROM batches;

CREATE INDEX batch_tasks_by_task ON batch_tasks (task_id);

CREATE TRIGGER tasks_deleted_batches AFTER DELETE ON tasks
BEGIN
    INSERT OR IGNORE INTO batches_to_check (batch_id)
    SELECT batch_id FROM batch_tasks WHERE task_id = OLD.id;
END;
