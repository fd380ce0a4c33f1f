-- batchd schema v1, PostgreSQL dialect (migrations/001_initial.sql is the SQLite one; the
-- two directories keep the same version numbers, so a version means the same schema on
-- both). Users insert into `tasks` (custom_id, params) and read status/result/error;
-- every other column has a default. docs/postgresql.md lists the per-column differences.
-- Unqualified names: the runner sets search_path to the configured schema.

CREATE TABLE batches (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api_batch_id       text UNIQUE,            -- msgbatch_...; NULL while creating
    state              text NOT NULL DEFAULT 'creating'
                       CHECK (state IN ('creating', 'in_progress', 'canceling', 'ended',
                                        'completed', 'rejected', 'lost')),
    request_count      integer NOT NULL,
    body_bytes         bigint NOT NULL,
    intent_at          timestamptz NOT NULL,   -- when the create call was decided
    submitted_at       timestamptz,            -- when the API confirmed it
    api_created_at     timestamptz,
    processing_status  text,
    request_counts     jsonb,                  -- the object as the API last sent it
    ended_at           timestamptz,
    results_url        text,
    last_polled_at     timestamptz,
    not_found_since    timestamptz,            -- first 404 of a run of them (spec 7.6)
    download_attempts  integer NOT NULL DEFAULT 0,
    completed_at       timestamptz,
    note               text                    -- why it was rejected / lost / re-downloaded
);

CREATE INDEX batches_by_state ON batches (state);

CREATE TABLE tasks (
    -- ALWAYS: an id given by a user's INSERT would collide with the identity's later ones
    -- (SQLite's INTEGER PRIMARY KEY picks max+1 instead; here it is refused).
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No check of the API's 1-64 [A-Za-z0-9_-] rule, as in SQLite: such a row is kept and
    -- marked `invalid` with the reason, rather than refused at the user's INSERT.
    custom_id          text NOT NULL UNIQUE,
    -- jsonb (so params->>'model' works): refused at INSERT if it is not JSON. jsonb keeps
    -- no text (key order, spaces, duplicate keys): a body is built from params::text, and
    -- its bytes are counted as sent, never from the user's original text.
    params             jsonb NOT NULL,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'submitted', 'succeeded', 'errored',
                                         'canceled', 'expired', 'invalid')),
    batch_id           bigint REFERENCES batches (id),
    attempts           integer NOT NULL DEFAULT 0,
    cancel_requested   boolean NOT NULL DEFAULT false,
    result             jsonb,                  -- the API's `result` object
    error              text,                   -- readable reason for every non-success
    model              text,
    input_tokens                 bigint,
    output_tokens                bigint,
    cache_creation_input_tokens  bigint,
    cache_read_input_tokens      bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    submitted_at       timestamptz,
    completed_at       timestamptz
);

-- The mark the migration runner looks for: a `tasks` table without it belongs to another
-- application, and batchd refuses to touch that schema.
COMMENT ON TABLE tasks IS 'batchd: tasks queue (users INSERT custom_id, params)';

CREATE INDEX tasks_by_status ON tasks (status, id);
CREATE INDEX tasks_by_batch ON tasks (batch_id) WHERE batch_id IS NOT NULL;

-- Batches on the API that carry our requests but were not the one we adopted: a
-- create whose response was lost and that reconciliation could not rule out.
CREATE TABLE duplicate_batches (
    api_batch_id  text PRIMARY KEY,
    local_id      bigint NOT NULL REFERENCES batches (id),
    detected_at   timestamptz NOT NULL,
    note          text NOT NULL
);

-- Result lines whose custom_id matched no task of their batch: kept, never dropped.
-- text, not jsonb: the line as it came, byte for byte.
CREATE TABLE unmatched_results (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api_batch_id  text NOT NULL,
    custom_id     text NOT NULL,
    line          text NOT NULL,
    received_at   timestamptz NOT NULL,
    UNIQUE (api_batch_id, custom_id)
);

-- The wake-up (PostgreSQL only): a committed INSERT into tasks notifies the daemons at
-- once instead of at their next poll tick. One notification per statement, not per row (a
-- COPY of 100,000 rows is one), delivered at COMMIT; the payload is the schema, so a
-- daemon can ignore another installation's tables in the same database. The tick stays:
-- notifications are lost while a listener is disconnected.
CREATE FUNCTION batchd_tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchd_tasks', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_insert AFTER INSERT ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_tasks_inserted();
