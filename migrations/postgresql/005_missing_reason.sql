-- batchd schema v5 (PostgreSQL): why a request's result never came. `no_line`: a whole
-- results stream had no line for it. `archived`: the batch's results were archived (29
-- days) before batchd wrote them. Either way the request is sent, and paid for, again.

ALTER TABLE missing_results ADD COLUMN reason text NOT NULL DEFAULT 'no_line'
    CHECK (reason IN ('no_line', 'archived'));
