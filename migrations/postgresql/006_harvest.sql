-- batchd schema v6 (PostgreSQL): every batch that may be ours is read to the end
-- (migrations/006_harvest.sql is the SQLite one, which says why each column exists;
-- docs/design.md, "Harvesting candidate batches").

-- A batch found on the API for one of our intents but not adopted: its own row, read for
-- the tasks of that intent (its members copied into batch_tasks).
ALTER TABLE batches ADD COLUMN candidate_for bigint REFERENCES batches (id);
-- What its results showed, once finished (NULL before, or when never read).
ALTER TABLE batches ADD COLUMN origin text
    CHECK (origin IN ('ours', 'partly_ours', 'foreign'));
ALTER TABLE batches ADD COLUMN foreign_lines integer NOT NULL DEFAULT 0;
-- An intent whose create's outcome was unknown: the list is searched until then for a
-- batch of it that lands late.
ALTER TABLE batches ADD COLUMN watch_until timestamptz;

ALTER TABLE duplicate_batches ADD COLUMN harvest_id bigint REFERENCES batches (id);

-- A result line for a task another batch had already answered: kept, never written over.
CREATE TABLE duplicate_results (
    api_batch_id  text NOT NULL,
    custom_id     text NOT NULL,
    line          text NOT NULL,
    received_at   timestamptz NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
);

-- Batches on the key that batchd did not create: listed in a reconcile window with a size
-- none of our unresolved creates has, or proven by their results.
CREATE TABLE foreign_batches (
    api_batch_id  text PRIMARY KEY,
    seen_at       timestamptz NOT NULL,
    how           text NOT NULL CHECK (how IN ('listed', 'results'))
);

CREATE INDEX batches_by_candidate_for ON batches (candidate_for) WHERE candidate_for IS NOT NULL;

-- Duplicates recorded by an older batchd were never read: they are read from now on.
INSERT INTO batches (api_batch_id, state, request_count, body_bytes, intent_at, candidate_for)
SELECT d.api_batch_id, 'in_progress', b.request_count, 0, b.intent_at, b.id
FROM duplicate_batches AS d JOIN batches AS b ON b.id = d.local_id
WHERE NOT EXISTS (SELECT 1 FROM batches AS x WHERE x.api_batch_id = d.api_batch_id);

UPDATE duplicate_batches AS d SET harvest_id = h.id
FROM batches AS h
WHERE h.api_batch_id = d.api_batch_id AND h.candidate_for IS NOT NULL;

INSERT INTO batch_tasks (batch_id, task_id)
SELECT h.id, m.task_id FROM batches AS h JOIN batch_tasks AS m ON m.batch_id = h.candidate_for
WHERE h.candidate_for IS NOT NULL;
