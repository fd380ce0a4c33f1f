-- batchd schema v5: why a request's result never came. `no_line`: a whole results stream
-- had no line for it. `archived`: the batch's results were archived (29 days) before
-- batchd wrote them. Either way the task was requeued, so the request is sent, and paid
-- for, again: `batchd status` reports both kinds.

ALTER TABLE missing_results ADD COLUMN reason TEXT NOT NULL DEFAULT 'no_line'
    CHECK (reason IN ('no_line', 'archived'));
