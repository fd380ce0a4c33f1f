-- batchd schema v1. Users insert into `tasks` (custom_id, params) and read
-- status/result/error; every other column has a default. See README "The database".

CREATE TABLE batches (
    id                 INTEGER PRIMARY KEY,
    api_batch_id       TEXT UNIQUE,            -- msgbatch_...; NULL while creating
    state              TEXT NOT NULL DEFAULT 'creating'
                       CHECK (state IN ('creating', 'in_progress', 'canceling', 'ended',
                                        'completed', 'rejected', 'lost')),
    request_count      INTEGER NOT NULL,
    body_bytes         INTEGER NOT NULL,
    intent_at          TEXT NOT NULL,          -- when the create call was decided (UTC ISO)
    submitted_at       TEXT,                   -- when the API confirmed it
    api_created_at     TEXT,
    processing_status  TEXT,
    request_counts     TEXT,                   -- JSON object as the API last sent it
    ended_at           TEXT,
    results_url        TEXT,
    last_polled_at     TEXT,
    not_found_since    TEXT,                   -- first 404 of a run of them (spec 7.6)
    download_attempts  INTEGER NOT NULL DEFAULT 0,
    completed_at       TEXT,
    note               TEXT                    -- why it was rejected / lost / re-downloaded
);

CREATE INDEX batches_by_state ON batches (state);

CREATE TABLE tasks (
    id                 INTEGER PRIMARY KEY,
    custom_id          TEXT NOT NULL UNIQUE,
    params             TEXT NOT NULL,          -- JSON text of a Messages API request
    status             TEXT NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'submitted', 'succeeded', 'errored',
                                         'canceled', 'expired', 'invalid')),
    batch_id           INTEGER REFERENCES batches (id),
    attempts           INTEGER NOT NULL DEFAULT 0,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    result             TEXT,                   -- the API's `result` object as JSON
    error              TEXT,                   -- readable reason for every non-success
    model              TEXT,
    input_tokens                 INTEGER,
    output_tokens                INTEGER,
    cache_creation_input_tokens  INTEGER,
    cache_read_input_tokens      INTEGER,
    created_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    submitted_at       TEXT,
    completed_at       TEXT
);

CREATE INDEX tasks_by_status ON tasks (status, id);
CREATE INDEX tasks_by_batch ON tasks (batch_id) WHERE batch_id IS NOT NULL;

-- Batches on the API that carry our requests but were not the one we adopted: a
-- create whose response was lost and that reconciliation could not rule out.
CREATE TABLE duplicate_batches (
    api_batch_id  TEXT PRIMARY KEY,
    local_id      INTEGER NOT NULL REFERENCES batches (id),
    detected_at   TEXT NOT NULL,
    note          TEXT NOT NULL
);

-- Result lines whose custom_id matched no task of their batch: kept, never dropped.
CREATE TABLE unmatched_results (
    id            INTEGER PRIMARY KEY,
    api_batch_id  TEXT NOT NULL,
    custom_id     TEXT NOT NULL,
    line          TEXT NOT NULL,
    received_at   TEXT NOT NULL,
    UNIQUE (api_batch_id, custom_id)
);
