-- batchd schema v11: nothing changes on SQLite. PostgreSQL's 011 checks the batches that
-- tasks and batch_tasks name once per statement instead of once per row
-- (migrations/postgresql/011_batch_checks.sql); SQLite's foreign keys stay as they are
-- (PRAGMA foreign_keys = ON, checked per row, which costs little there). The number is
-- kept so that a version means the same schema in both dialects.
SELECT 1;
