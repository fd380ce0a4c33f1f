-- batchd schema v13: nothing changes on SQLite. `batchd prune` finds the tasks finished
-- before its cutoff oldest first, paged by (completed_at, id), from tasks_by_completion
-- (migration 010): a SQLite index holds the rowid after its columns, so (completed_at)
-- is already (completed_at, id) there. PostgreSQL's 013 adds the id to its index
-- (migrations/postgresql/013_prune_by_completion.sql). The number is kept so that a
-- version means the same schema in both dialects.
SELECT 1;
