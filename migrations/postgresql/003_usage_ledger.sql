-- batchd schema v3 (PostgreSQL): what the work cost, and results the API never sent.
--
-- usage_ledger sums the usage of succeeded results per UTC day and model, apart from
-- `tasks`, so that `batchd prune`, a user's DELETE or a `batchd retry` never erases money
-- already spent. A trigger fills it, so every path that writes a succeeded result is
-- counted, whoever wrote it.

CREATE TABLE usage_ledger (
    day                          date NOT NULL,     -- UTC date the result was written
    model                        text NOT NULL,     -- the result's model; '' if it had none
    requests                     bigint NOT NULL,
    input_tokens                 bigint NOT NULL,
    output_tokens                bigint NOT NULL,
    cache_creation_input_tokens  bigint NOT NULL,
    cache_read_input_tokens      bigint NOT NULL,
    PRIMARY KEY (day, model)
);

-- Per statement, over its transition tables, not per row as in SQLite: a row trigger
-- upserts the same (day, model) row once per result, each upsert a new version of it. A
-- 5,000-row write-back took 0.47-0.58 s with a row trigger and 0.16-0.18 s with this one,
-- the same as with none (a 10,000-row claim: no difference either); one statement adds one
-- row per (day, model) it touched.
-- SET search_path FROM CURRENT: the trigger runs in the session of whoever updates
-- `tasks` (a user's psql too), whose search_path may not include batchd's schema.
CREATE FUNCTION batchd_tasks_succeeded() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO usage_ledger AS l (day, model, requests, input_tokens, output_tokens,
                                   cache_creation_input_tokens, cache_read_input_tokens)
    SELECT (coalesce(n.completed_at, now()) AT TIME ZONE 'UTC')::date, coalesce(n.model, ''),
           count(*), sum(coalesce(n.input_tokens, 0)), sum(coalesce(n.output_tokens, 0)),
           sum(coalesce(n.cache_creation_input_tokens, 0)),
           sum(coalesce(n.cache_read_input_tokens, 0))
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.status = 'succeeded' AND o.status IS DISTINCT FROM 'succeeded'
    GROUP BY 1, 2
    ON CONFLICT (day, model) DO UPDATE SET
        requests = l.requests + excluded.requests,
        input_tokens = l.input_tokens + excluded.input_tokens,
        output_tokens = l.output_tokens + excluded.output_tokens,
        cache_creation_input_tokens =
            l.cache_creation_input_tokens + excluded.cache_creation_input_tokens,
        cache_read_input_tokens = l.cache_read_input_tokens + excluded.cache_read_input_tokens;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_usage_ledger AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_tasks_succeeded();

-- Requests of a completed batch that got no result line although the stream was whole:
-- re-queued, and remembered here so `batchd status` can report them.
CREATE TABLE missing_results (
    api_batch_id  text NOT NULL,
    custom_id     text NOT NULL,
    detected_at   timestamptz NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
);
