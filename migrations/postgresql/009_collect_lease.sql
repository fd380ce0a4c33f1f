-- batchd schema v9 (PostgreSQL): polling and write-back shared by every daemon on the
-- database (docs/postgresql-design.md, "Polling" and "Collecting an ended batch").
--
-- collector / collect_lease_until: the row lease of an `ended` batch's collection. Taken
-- with `FOR UPDATE SKIP LOCKED` by one daemon (`collector`, its instance name) until
-- `collect_lease_until` (the server's clock), renewed every third of the lease while it
-- downloads and applies; the finish (`ended -> completed`) is guarded by it. A holder that
-- dies stops renewing: after the expiry another daemon takes the batch over. Given back:
-- collect_lease_until NULL. `collector` stays after the finish: who collected the batch.
-- next_poll_at: the due-time claim of a poll (in_progress, canceling): a daemon that
-- takes a batch to poll sets it one poll interval ahead, so the others skip it meanwhile.
-- NULL: due now (a batch just created or found).

ALTER TABLE batches ADD COLUMN collector text;
ALTER TABLE batches ADD COLUMN collect_lease_until timestamptz;
ALTER TABLE batches ADD COLUMN next_poll_at timestamptz;
