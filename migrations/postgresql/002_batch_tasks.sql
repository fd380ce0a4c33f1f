-- batchd schema v2 (PostgreSQL): which tasks each batch carried. tasks.batch_id forgets a
-- batch when a task is requeued, so without this a re-downloaded line of a requeued task
-- could not be told from a line of a task that was never in the batch. Filled when tasks
-- are claimed; rows are never updated.

CREATE TABLE batch_tasks (
    batch_id  bigint NOT NULL REFERENCES batches (id),
    task_id   bigint NOT NULL,           -- no foreign key: users may delete their tasks
    PRIMARY KEY (batch_id, task_id)
);
