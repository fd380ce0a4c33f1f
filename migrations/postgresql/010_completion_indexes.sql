-- batchd schema v10 (PostgreSQL; migrations/010_completion_indexes.sql is the SQLite one):
-- the reads on a timer that ask "what finished since T" walk an index from T on, instead
-- of every finished task (issue 16: nothing on a timer reads all rows); and `batchd
-- prune` finds the tasks finished before its cutoff from tasks_by_status alone, as SQLite's
-- 007 made it do there.
--
-- `completed_since` (`batchd status --watch`'s throughput, every refresh) read every row
-- of tasks. Partial: a task not finished has no entry, so claims and retries write none.
CREATE INDEX IF NOT EXISTS tasks_by_completion ON tasks (completed_at) WHERE completed_at IS NOT NULL;

-- The web view's throughput per batch (`batch_completions_since`, every refresh) read
-- every completed batch to keep those of the last hour: the state and the time in one
-- index give the window, in order.
CREATE INDEX IF NOT EXISTS batches_by_completion ON batches (state, completed_at);

-- The status snapshot (`batchd status`, the web view, every refresh) counts the batches
-- proven foreign (`shared_key_evidence`): it read every batch. Few batches are foreign,
-- so the index is small and most writes of batches never touch it.
CREATE INDEX IF NOT EXISTS batches_foreign ON batches (id) WHERE origin = 'foreign';

-- completed_at joins the status index as a key column, so prune's `completed_at < cutoff`
-- is checked in the index (an index condition, not a filter on the table): without it a
-- prune read every finished task's row (2,000,000 heap rows) to learn it is recent. The
-- entry is rewritten anyway when a task finishes (its status changes in the same UPDATE).
DROP INDEX tasks_by_status;
CREATE INDEX tasks_by_status ON tasks (status, id, completed_at);
