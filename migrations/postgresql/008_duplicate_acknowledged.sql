-- batchd schema v8 (PostgreSQL): an operator's acknowledgement of a suspected duplicate
-- batch (`batchd acknowledge-duplicate`): kept for the record, no longer reported.
-- NULL: not acknowledged.

ALTER TABLE duplicate_batches ADD COLUMN acknowledged_at timestamptz;
ALTER TABLE duplicate_batches ADD COLUMN acknowledged_note text;
