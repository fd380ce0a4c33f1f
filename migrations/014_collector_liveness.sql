-- batchd schema v15: whether a collection lease's holder held its liveness lock as it took
-- or renewed the lease (migrations/postgresql/014_collector_liveness.sql says what it
-- means). On SQLite the column exists, so both dialects' schemas stay the same, and stays
-- unused: a file admits one daemon (its file lock), whose leases are always its own.
ALTER TABLE batches ADD COLUMN collector_lock_held INTEGER NOT NULL DEFAULT 0;
