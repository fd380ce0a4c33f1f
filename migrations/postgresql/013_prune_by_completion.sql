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
