-- batchd schema v6: every batch that may be ours is read to the end (docs/design.md,
-- "Harvesting candidate batches").
--
-- A batch found on the API for one of our intents but not adopted (a suspected duplicate:
-- several matched, or one landed after its intent was released) gets a `batches` row of its
-- own with `candidate_for` naming that intent, and the intent's members copied into
-- batch_tasks: it is polled and its results streamed like our own batches, but its lines
-- may only answer tasks of that intent still waiting for a result, and it never requeues.
-- duplicate_batches keeps the report (and, with `harvest_id`, which row reads it).
ALTER TABLE batches ADD COLUMN candidate_for INTEGER REFERENCES batches (id);

-- What the results of a batch showed, decided when it is finished: 'ours' (every line
-- answered a task of its intent), 'partly_ours' (some lines named no task of the intent:
-- kept in unmatched_results), 'foreign' (no line named any task of ours: another client's
-- batch, its lines only counted). NULL until then, or when results were never read.
-- (A column, not a `state`: SQLite cannot widen the state CHECK without rebuilding a
-- table that three others reference.)
ALTER TABLE batches ADD COLUMN origin TEXT
    CHECK (origin IN ('ours', 'partly_ours', 'foreign'));
ALTER TABLE batches ADD COLUMN foreign_lines INTEGER NOT NULL DEFAULT 0;

-- An intent released because its create's outcome stayed unknown: until this moment the
-- list is still searched for a batch that lands late (list lag, late commit).
ALTER TABLE batches ADD COLUMN watch_until TEXT;

ALTER TABLE duplicate_batches ADD COLUMN harvest_id INTEGER REFERENCES batches (id);

-- A result line for a task that another batch had already answered: the first written
-- wins, this one is kept here (paid for, never overwriting).
CREATE TABLE duplicate_results (
    api_batch_id  TEXT NOT NULL,
    custom_id     TEXT NOT NULL,
    line          TEXT NOT NULL,
    received_at   TEXT NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
) WITHOUT ROWID;

-- Batches seen on the API's list in a reconcile window that batchd did not create (their
-- request count matched none of our unresolved creates), or proven foreign by their
-- results: the key is shared with another tool (docs/operations.md).
CREATE TABLE foreign_batches (
    api_batch_id  TEXT PRIMARY KEY,
    seen_at       TEXT NOT NULL,
    how           TEXT NOT NULL CHECK (how IN ('listed', 'results'))
) WITHOUT ROWID;

CREATE INDEX batches_by_candidate_for ON batches (candidate_for) WHERE candidate_for IS NOT NULL;

-- Duplicates recorded by an older batchd were never read: they are read now, from the
-- poll on (results archived meanwhile finish it as archived; a batch the API forgot is
-- lost after the not-found grace).
INSERT INTO batches (api_batch_id, state, request_count, body_bytes, intent_at, candidate_for)
SELECT d.api_batch_id, 'in_progress', b.request_count, 0, b.intent_at, b.id
FROM duplicate_batches AS d JOIN batches AS b ON b.id = d.local_id
WHERE d.api_batch_id NOT IN (SELECT api_batch_id FROM batches WHERE api_batch_id IS NOT NULL);

UPDATE duplicate_batches SET harvest_id = (
    SELECT h.id FROM batches AS h
    WHERE h.api_batch_id = duplicate_batches.api_batch_id AND h.candidate_for IS NOT NULL);

INSERT INTO batch_tasks (batch_id, task_id)
SELECT h.id, m.task_id FROM batches AS h JOIN batch_tasks AS m ON m.batch_id = h.candidate_for
WHERE h.candidate_for IS NOT NULL;
