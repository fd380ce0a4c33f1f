-- batchd schema v10 (IF NOT EXISTS: a test rolls a database back to an older version by
-- its records and migrates it again): the reads on a timer that ask "what finished since T" walk an index
-- from T on, instead of every finished task (issue 16: nothing on a timer reads all rows).
--
-- `completed_since` (`batchd status --watch`'s throughput, every refresh) counted the
-- tasks with completed_at >= T by reading every row of the table: 2,000,000 finished tasks
-- were read on each refresh. Partial: a task not finished has no entry, so claims and
-- retries write none; a finishing task adds one entry at the index's right end (times
-- grow), and prune removes them from its left end.
CREATE INDEX IF NOT EXISTS tasks_by_completion ON tasks (completed_at) WHERE completed_at IS NOT NULL;

-- The web view's throughput per batch (`batch_completions_since`, every refresh) read
-- every completed batch through batches_by_state to keep those of the last hour (and
-- sorted them): the state and the time in one index give the window, in order.
CREATE INDEX IF NOT EXISTS batches_by_completion ON batches (state, completed_at);

-- The status snapshot (`batchd status`, the web view, every refresh) counts the batches
-- proven foreign (`shared_key_evidence`): it read every batch. Few batches are foreign,
-- so the index is small and most writes of batches never touch it.
CREATE INDEX IF NOT EXISTS batches_foreign ON batches (id) WHERE origin = 'foreign';
