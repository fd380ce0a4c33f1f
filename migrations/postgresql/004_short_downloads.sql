-- batchd schema v4 (PostgreSQL): whole results streams that held fewer lines than the batch
-- had requests, counted apart from transport failures (download_attempts counts both).

ALTER TABLE batches ADD COLUMN short_downloads integer NOT NULL DEFAULT 0;
