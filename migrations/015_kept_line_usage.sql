-- batchd schema v16: money paid is money recorded, for result lines no task holds.
--
-- The API bills every succeeded line (spec §5; errored, canceled and expired lines are
-- not billed). The ledger (003) counted only lines written to a task; a line kept in
-- duplicate_results (another batch answered its task first) or in unmatched_results (no
-- task of its batch: one the user deleted, a stray custom_id) was paid for and never
-- counted, so costs, the budget and /metrics undercounted exactly when faults happened.
--
-- kept_line_usage: the usage of each billed line kept aside, one row per line of an API
-- batch (its billing identity), inserted in the transaction that keeps the line. A line
-- kept again (a re-download), or kept once as a duplicate and later as unmatched (its task
-- deleted between two downloads), is one row: counted once. Its trigger adds it to
-- usage_ledger. The lines of a batch proven foreign (another client's) are dropped with
-- their rows and taken back out of the ledger (store/*/settle.py): not ours to pay.
CREATE TABLE kept_line_usage (
    api_batch_id                 TEXT NOT NULL,
    custom_id                    TEXT NOT NULL,
    kept_in                      TEXT NOT NULL CHECK (kept_in IN ('duplicate', 'unmatched')),
    day                          TEXT NOT NULL,     -- UTC date the line was kept
    model                        TEXT NOT NULL,     -- the result's model; '' if it had none
    input_tokens                 INTEGER NOT NULL,
    output_tokens                INTEGER NOT NULL,
    cache_creation_input_tokens  INTEGER NOT NULL,
    cache_read_input_tokens      INTEGER NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
) WITHOUT ROWID;

CREATE TRIGGER kept_line_usage_ledger AFTER INSERT ON kept_line_usage
BEGIN
    INSERT INTO usage_ledger (day, model, requests, input_tokens, output_tokens,
                              cache_creation_input_tokens, cache_read_input_tokens)
    VALUES (NEW.day, NEW.model, 1, NEW.input_tokens, NEW.output_tokens,
            NEW.cache_creation_input_tokens, NEW.cache_read_input_tokens)
    ON CONFLICT (day, model) DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cache_creation_input_tokens =
            cache_creation_input_tokens + excluded.cache_creation_input_tokens,
        cache_read_input_tokens = cache_read_input_tokens + excluded.cache_read_input_tokens;
END;

-- Billed lines kept by an older batchd: counted now, once (the trigger above). A malformed
-- line (`malformed-line-N`) proves no bill and is left out, as it is from now on. A token
-- count that is not an integer counts as zero, as the result parser reads it.
INSERT OR IGNORE INTO kept_line_usage
SELECT api_batch_id, custom_id, kept_in, substr(received_at, 1, 10),
       CASE WHEN json_type(line, '$.result.message.model') = 'text'
            THEN json_extract(line, '$.result.message.model') ELSE '' END,
       CASE WHEN json_type(line, '$.result.message.usage.input_tokens') = 'integer'
            THEN json_extract(line, '$.result.message.usage.input_tokens') ELSE 0 END,
       CASE WHEN json_type(line, '$.result.message.usage.output_tokens') = 'integer'
            THEN json_extract(line, '$.result.message.usage.output_tokens') ELSE 0 END,
       CASE WHEN json_type(line, '$.result.message.usage.cache_creation_input_tokens') = 'integer'
            THEN json_extract(line, '$.result.message.usage.cache_creation_input_tokens')
            ELSE 0 END,
       CASE WHEN json_type(line, '$.result.message.usage.cache_read_input_tokens') = 'integer'
            THEN json_extract(line, '$.result.message.usage.cache_read_input_tokens')
            ELSE 0 END
FROM (SELECT api_batch_id, custom_id, line, received_at, 'duplicate' AS kept_in
      FROM duplicate_results
      UNION ALL
      SELECT api_batch_id, custom_id, line, received_at, 'unmatched' FROM unmatched_results)
WHERE custom_id NOT LIKE 'malformed-line-%' AND json_valid(line)
    AND json_extract(line, '$.result.type') = 'succeeded';
