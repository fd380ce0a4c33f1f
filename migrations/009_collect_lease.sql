-- batchd schema v9: nothing to change on SQLite. On PostgreSQL this version adds the row
-- lease of an ended batch's collection and the due-time claim of polls, which let several
-- daemons share one database; a SQLite file admits one daemon (its file lock), whose lease
-- is always its own (batchd/store/sqlite/collecting.py). The version is kept so both
-- dialects' numbers mean the same schema.
SELECT 1;
