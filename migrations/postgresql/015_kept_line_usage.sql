-- batchd schema v16 (PostgreSQL): money paid is money recorded, for result lines no task
-- holds (migrations/015_kept_line_usage.sql says why).
--
-- kept_line_usage: the usage of each billed (succeeded) line kept aside in
-- duplicate_results or unmatched_results, one row per line of an API batch, inserted in
-- the transaction that keeps the line; a line kept again is one row, counted once. Its
-- trigger adds it to usage_ledger. A batch proven foreign takes its rows back out
-- (store/postgres/settle.py).
CREATE TABLE kept_line_usage (
    api_batch_id                 text NOT NULL,
    custom_id                    text NOT NULL,
    kept_in                      text NOT NULL CHECK (kept_in IN ('duplicate', 'unmatched')),
    day                          date NOT NULL,     -- UTC date the line was kept
    model                        text NOT NULL,     -- the result's model; '' if it had none
    input_tokens                 bigint NOT NULL,
    output_tokens                bigint NOT NULL,
    cache_creation_input_tokens  bigint NOT NULL,
    cache_read_input_tokens      bigint NOT NULL,
    PRIMARY KEY (api_batch_id, custom_id)
);

-- Per statement over its transition table, as 003's: a whole duplicate batch kept in one
-- statement adds one upsert per (day, model), not one per line. Only the rows inserted
-- are in `new_rows` (ON CONFLICT DO NOTHING leaves the others out): counted once.
-- OR REPLACE: a schema rolled back by dropping the table keeps the function.
CREATE OR REPLACE FUNCTION batchd_kept_line_billed() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO usage_ledger AS l (day, model, requests, input_tokens, output_tokens,
                                   cache_creation_input_tokens, cache_read_input_tokens)
    SELECT n.day, n.model, count(*), sum(n.input_tokens), sum(n.output_tokens),
           sum(n.cache_creation_input_tokens), sum(n.cache_read_input_tokens)
    FROM new_rows AS n
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

CREATE TRIGGER kept_line_usage_ledger AFTER INSERT ON kept_line_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_kept_line_billed();

-- Billed lines kept by an older batchd: counted now, once. A malformed line
-- (`malformed-line-N`) proves no bill and is left out, as from now on; every other kept
-- line was built by batchd from a parsed result (valid JSON; `json`, not `jsonb`, which
-- would refuse a \u0000 the API sent). A line holding the text \u0000 anywhere is left
-- out too: reading any field of it as text refuses the whole line ("\u0000 cannot be
-- converted to text"), and one such line would stop the upgrade (review 8); an older
-- batchd kept such a line when a result stalled on it (docs/postgresql.md, "A NUL in a
-- result"). A token count that is not an integer counts as zero.
CREATE FUNCTION pg_temp.kept_tokens(line json, kind text) RETURNS bigint LANGUAGE sql AS $$
    SELECT CASE WHEN (line #>> ARRAY['result', 'message', 'usage', kind]) ~ '^-?[0-9]{1,18}$'
                THEN (line #>> ARRAY['result', 'message', 'usage', kind])::bigint ELSE 0 END
$$;

INSERT INTO kept_line_usage
SELECT k.api_batch_id, k.custom_id, k.kept_in, (k.received_at AT TIME ZONE 'UTC')::date,
       CASE WHEN json_typeof(k.line -> 'result' -> 'message' -> 'model') = 'string'
            THEN k.line -> 'result' -> 'message' ->> 'model' ELSE '' END,
       pg_temp.kept_tokens(k.line, 'input_tokens'),
       pg_temp.kept_tokens(k.line, 'output_tokens'),
       pg_temp.kept_tokens(k.line, 'cache_creation_input_tokens'),
       pg_temp.kept_tokens(k.line, 'cache_read_input_tokens')
FROM (SELECT api_batch_id, custom_id,
             -- CASE, not a WHERE: the cast must never be tried on a line left out.
             CASE WHEN strpos(line, '\u0000') = 0 THEN line::json END AS line,
             received_at, 'duplicate' AS kept_in
      FROM duplicate_results
      UNION ALL
      SELECT api_batch_id, custom_id,
             CASE WHEN custom_id NOT LIKE 'malformed-line-%' AND strpos(line, '\u0000') = 0
                  THEN line::json END,
             received_at, 'unmatched'
      FROM unmatched_results) AS k
WHERE k.line -> 'result' ->> 'type' = 'succeeded'
ON CONFLICT DO NOTHING;

DROP FUNCTION pg_temp.kept_tokens(json, text);
