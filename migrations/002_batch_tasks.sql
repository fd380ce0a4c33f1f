-- batchd schema v2: which tasks each batch carried. tasks.batch_id forgets a batch when a
-- task is requeued, so without this a re-downloaded line of a requeued task (a crash
-- midway through writing results) could not be told from a line of a task that was
-- never in the batch. Filled when tasks are claimed; rows are never updated.

CREATE TABLE batch_tasks (
    batch_id  INTEGER NOT NULL REFERENCES batches (id),
    task_id   INTEGER NOT NULL,          -- no foreign key: users may delete their tasks
    PRIMARY KEY (batch_id, task_id)
) WITHOUT ROWID;

-- Batches in flight when a v1 database is upgraded: their tasks still point at them.
INSERT INTO batch_tasks (batch_id, task_id)
SELECT batch_id, id FROM tasks WHERE batch_id IS NOT NULL;
