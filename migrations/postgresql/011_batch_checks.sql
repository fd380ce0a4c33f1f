-- batchd schema v11 (PostgreSQL): tasks.batch_id and batch_tasks.batch_id are checked
-- against batches once per statement, over its transition tables, instead of once per
-- row by their foreign keys (migrations/011_batch_checks.sql, SQLite, changes nothing).
--
-- A claim moves 10,000 tasks to their batch and inserts 10,000 links: the foreign keys'
-- row triggers ran 20,000 lookups of the same batches row, 35-40% of the claim's time
-- (bench/README.md). These checks keep what the foreign keys kept, for users' writes too:
-- - a row of tasks or batch_tasks never names a batch that does not exist: each INSERT or
--   UPDATE checks the distinct batches its rows name, in one query, and locks them
--   FOR KEY SHARE as the foreign key did, so a concurrent DELETE of one of them waits for
--   this transaction (and then fails below) or, if it came first, fails this one;
-- - a batch still named by a task or a link cannot be deleted: DELETE FROM batches
--   checks its deleted ids (index tasks_by_batch, batch_tasks' key) once per statement.
-- Like every check batchd's own triggers make, it runs as batchd's role (SECURITY
-- DEFINER, search_path fixed): a producer role may INSERT tasks without any right on
-- batches. TRUNCATE batches is no longer refused while tasks name them (the foreign key
-- refused it); batchd never truncates. Written to apply again harmlessly (IF EXISTS, OR
-- REPLACE; PostgreSQL 14 or later).

ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_batch_id_fkey;
ALTER TABLE batch_tasks DROP CONSTRAINT IF EXISTS batch_tasks_batch_id_fkey;

CREATE OR REPLACE FUNCTION batchd_batches_named() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    named bigint[];
    found bigint;
BEGIN
    SELECT array_agg(DISTINCT batch_id) INTO named FROM new_rows WHERE batch_id IS NOT NULL;
    IF named IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO found
    FROM (SELECT 1 FROM batches WHERE id = ANY (named) FOR KEY SHARE) AS locked;
    IF found <> cardinality(named) THEN
        RAISE EXCEPTION 'insert or update on table "%" names a batch that does not exist',
            TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('batches named: %s', named);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION batchd_batches_deleted() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasks AS t JOIN old_rows AS o ON t.batch_id = o.id)
       OR EXISTS (SELECT 1 FROM batch_tasks AS m JOIN old_rows AS o ON m.batch_id = o.id)
    THEN
        RAISE EXCEPTION 'delete on table "batches" would leave rows naming a deleted batch'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER tasks_batch_named_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_batches_named();

CREATE OR REPLACE TRIGGER tasks_batch_named_update AFTER UPDATE ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_batches_named();

-- One event each: a trigger with transition tables may have only one.
CREATE OR REPLACE TRIGGER batch_tasks_batch_named_insert AFTER INSERT ON batch_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_batches_named();

CREATE OR REPLACE TRIGGER batch_tasks_batch_named_update AFTER UPDATE ON batch_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_batches_named();

CREATE OR REPLACE TRIGGER batches_deleted_named AFTER DELETE ON batches
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION batchd_batches_deleted();
