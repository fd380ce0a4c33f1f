-- batchd schema v4: whole results streams that held fewer lines than the batch had
-- requests, counted apart from transport failures (download_attempts counts both). Only
-- these count toward [results] max_download_attempts: after that many, the batch is
-- finished and its tasks without a line requeued. Counting transport failures too let ten
-- network errors turn the next short stream into a requeue, and a second payment.

ALTER TABLE batches ADD COLUMN short_downloads INTEGER NOT NULL DEFAULT 0;
