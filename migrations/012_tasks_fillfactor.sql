-- batchd schema v12: nothing changes on SQLite. PostgreSQL's 012 sets a fillfactor on
-- tasks so that new tasks and their claims fill pages together rather than the one-row
-- holes its free space map finds across the finished history
-- (migrations/postgresql/012_tasks_fillfactor.sql). SQLite places a row by its key (the
-- rowid B-tree): a new task goes to the last leaf page whatever the history holds. The
-- number is kept so that a version means the same schema in both dialects.
SELECT 1;
