-- batchd schema v7 (PostgreSQL): how many tasks are in each status, kept as rows change
-- (migrations/007_flat_costs.sql is the SQLite one), so that status, /metrics, /healthz
-- and the progress display read 7 rows, not every task (issue 16).
--
-- Per statement, over its transition tables, as the usage ledger (003): one UPDATE of the
-- counts per statement, not one per task. A TRUNCATE empties the counts too. The count
-- rows are hot: a writer that changes a status's count holds its row until it commits,
-- so keep transactions short (they are: claims and write-back ranges). batchd's own
-- decisions (idle, anything pending) never read these counts: they ask the tasks.
-- SECURITY DEFINER: a producer role (docs/postgresql.md) may INSERT tasks but has no
-- right on task_counts; the functions run as their owner, batchd's role, with the
-- search_path fixed when they were created, so a caller's path cannot redirect them.

CREATE TABLE task_counts (
    status  text PRIMARY KEY,
    tasks   bigint NOT NULL
);

INSERT INTO task_counts (status, tasks)
SELECT s.status, (SELECT count(*) FROM tasks WHERE tasks.status = s.status)
FROM unnest(ARRAY['pending', 'submitted', 'succeeded', 'errored', 'canceled', 'expired',
                  'invalid']) AS s (status);

CREATE FUNCTION batchd_task_counts_added() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE task_counts AS c SET tasks = c.tasks + d.n
    FROM (SELECT status, count(*) AS n FROM new_rows GROUP BY status) AS d
    WHERE c.status = d.status;
    RETURN NULL;
END
$$;

CREATE FUNCTION batchd_task_counts_removed() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE task_counts AS c SET tasks = c.tasks - d.n
    FROM (SELECT status, count(*) AS n FROM old_rows GROUP BY status) AS d
    WHERE c.status = d.status;
    RETURN NULL;
END
$$;

-- Old and new rows are the same tasks: the net change per status is what moved.
CREATE FUNCTION batchd_task_counts_moved() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE task_counts AS c SET tasks = c.tasks + d.n
    FROM (SELECT status, sum(n) AS n
          FROM (SELECT status, 1 AS n FROM new_rows
                UNION ALL SELECT status, -1 FROM old_rows) AS t
          GROUP BY status HAVING sum(n) <> 0) AS d
    WHERE c.status = d.status;
    RETURN NULL;
END
$$;

CREATE FUNCTION batchd_task_counts_truncated() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE task_counts SET tasks = 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_task_counts_added();

CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_task_counts_removed();

CREATE TRIGGER task_counts_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_task_counts_moved();

CREATE TRIGGER task_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_task_counts_truncated();

-- Batches that lost a task, for `batchd prune` to look at (forget_empty_batches), instead
-- of every link of every finished batch. Every batch of an older database is looked at
-- once, at the first prune after this migration.
CREATE TABLE batches_to_check (
    batch_id  bigint PRIMARY KEY
);
INSERT INTO batches_to_check (batch_id) SELECT id FROM batches;

CREATE INDEX batch_tasks_by_task ON batch_tasks (task_id);

CREATE FUNCTION batchd_tasks_deleted_batches() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO batches_to_check (batch_id)
    SELECT DISTINCT m.batch_id FROM old_rows AS o JOIN batch_tasks AS m ON m.task_id = o.id
    ON CONFLICT (batch_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_deleted_batches AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_tasks_deleted_batches();
