-- batchd schema v9: the row lease of an ended batch's collection and the due-time claim of
-- polls, which let several daemons share one PostgreSQL database (migrations/postgresql/
-- 009_collect_lease.sql says what each column means). On SQLite the columns exist, so both
-- dialects' schemas stay the same, and stay unused: a file admits one daemon (its file
-- lock), whose lease is always its own (batchd/store/sqlite/collecting.py).

ALTER TABLE batches ADD COLUMN collector TEXT;
ALTER TABLE batches ADD COLUMN collect_lease_until TEXT;
ALTER TABLE batches ADD COLUMN next_poll_at TEXT;
