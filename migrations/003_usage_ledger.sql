-- batchd schema v3: what the work cost, and results the API never sent.
--
-- usage_ledger sums the usage of succeeded results per UTC day and model. It is kept
-- apart from `tasks` so that `batchd prune`, a user's DELETE or a `batchd retry` of a
-- succeeded task never erases money already spent: costs and budgets read this table.
-- A trigger fills it, so every path that writes a succeeded result is counted, whoever
-- wrote it. Prices are not stored: they are applied when read, from the config.

CREATE TABLE usage_ledger (
    day                          TEXT NOT NULL,     -- UTC date the result was written
    model                        TEXT NOT NULL,     -- the result's model; '' if it had none
    requests                     INTEGER NOT NULL,
    input_tokens                 INTEGER NOT NULL,
    output_tokens                INTEGER NOT NULL,
    cache_creation_input_tokens  INTEGER NOT NULL,
    cache_read_input_tokens      INTEGER NOT NULL,
    PRIMARY KEY (day, model)
) WITHOUT ROWID;

CREATE TRIGGER tasks_usage_ledger AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'succeeded' AND OLD.status IS NOT 'succeeded'
BEGIN
    INSERT INTO usage_ledger (day, model, requests, input_tokens, output_tokens,
                              cache_creation_input_tokens, cache_read_input_tokens)
    VALUES (substr(coalesce(NEW.completed_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), 1, 10),
            coalesce(NEW.model, ''), 1, coalesce(NEW.input_tokens, 0),
            coalesce(NEW.output_tokens, 0), coalesce(NEW.cache_creation_input_tokens, 0),
            coalesce(NEW.cache_read_input_tokens, 0))
    ON CONFLICT (day, model) DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cache_creation_input_tokens =
            cache_creation_input_tokens + excluded.cache_creation_input_tokens,
        cache_read_input_tokens = cache_read_input_tokens + excluded.cache_read_input_tokens;
END;

-- Results already written by an older batchd.
INSERT INTO usage_ledger
SELECT substr(coalesce(completed_at, created_at), 1, 10), coalesce(model, ''), count(*),
       sum(coalesce(input_tokens, 0)), sum(coalesce(output_tokens, 0)),
       sum(coalesce(cache_creation_input_tokens, 0)), sum(coalesce(cache_read_input_tokens, 0))
FROM tasks WHERE status = 'succeeded'
GROUP BY 1, 2;

-- Requests of a completed batch that got no result line although the stream was whole:
-- re-queued, and remembered here so `batchd status` can report them.
CREATE TABLE missing_results (
    api_batch_id  TEXT NOT NULL,
    custom_id     TEXT NOT NULL,
    detected_at   TEXT NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
) WITHOUT ROWID;
