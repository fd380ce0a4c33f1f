-- batchd schema v13 (PostgreSQL; SQLite's 013 changes nothing): tasks_by_completion
-- becomes (completed_at, id), so `batchd prune` pages the tasks finished before its
-- cutoff by key, oldest first: `(completed_at, id) > ($1, $2) AND completed_at < cutoff
-- ORDER BY completed_at, id` is one index range, whatever the history holds.
--
-- Why (bench/README.md, "Session 6: prune"): prune paged each final status by id through
-- tasks_by_status (status, id, completed_at), which reads every finished task's entry up to
-- the last old one: 2,000,000 entries to find 100,000 old tasks. On (completed_at) alone,
-- ties (a write-back range finishes thousands of tasks at one now()) are ordered by their
-- place in the heap, not by id, so a key could not resume inside a tie. `completed_since`
-- (migration 010) reads the same range of the new index.
DROP INDEX tasks_by_completion;
CREATE INDEX tasks_by_completion ON tasks (completed_at, id) WHERE completed_at IS NOT NULL;

-- The DELETE trigger that marks the batches a deleted task was in (migration 007) joined
-- its transition table to batch_tasks, which the planner (no statistics of the old rows)
-- did by reading all of batch_tasks: 0.9 s per 25,000 tasks deleted at 2,000,000 links,
-- most of a prune's time (EXPLAIN ANALYZE, bench/README.md "Session 6: prune"). The ids
-- as an array make it a probe of batch_tasks_by_task per deleted task.
CREATE OR REPLACE FUNCTION batchd_tasks_deleted_batches() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO batches_to_check (batch_id)
    SELECT DISTINCT m.batch_id FROM batch_tasks AS m
    WHERE m.task_id = ANY (ARRAY(SELECT id FROM old_rows))
    ON CONFLICT (batch_id) DO NOTHING;
    RETURN NULL;
END
$$;
