-- batchd schema v15 (PostgreSQL): a collection lease whose holder is known dead is taken
-- over at once, not at its expiry (docs/postgresql-design.md, "Collecting an ended batch").
--
-- Each daemon holds, for its whole life, a session advisory lock keyed by its instance
-- name (batchd/store/postgres/liveness.py). collector_lock_held: the holder (`collector`)
-- held that lock in the transaction that took or last renewed the lease. Once the lock is
-- free, the session that held it ended (the process died, or is cut off), and the lease
-- is free too. false (every lease before this version, and a holder that never won its
-- lock): the lease is taken over at its expiry only, as before.
ALTER TABLE batches ADD COLUMN collector_lock_held boolean NOT NULL DEFAULT false;
