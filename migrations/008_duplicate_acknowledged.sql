-- batchd schema v8: an operator's acknowledgement of a suspected duplicate batch
-- (`batchd acknowledge-duplicate`). The row stays, for the record (the batch was paid
-- for, and reconcile must never adopt it); an acknowledged one is no longer reported by
-- `batchd status`, the status document or the metrics. NULL: not acknowledged.
-- (Numbered 8 while schema versions 6 and 7 are being written elsewhere.)

ALTER TABLE duplicate_batches ADD COLUMN acknowledged_at TEXT;
ALTER TABLE duplicate_batches ADD COLUMN acknowledged_note TEXT;
