-- batchd schema v15 (PostgreSQL): tasks.revision, moved on whenever a user changes a
-- task's request (its params or its custom_id) with an UPDATE. The chunker builds a body
-- from the rows it read; the claim (record_intent) takes a task only at the revision read,
-- so a request edited between the read and the claim is never sent from its old text, nor
-- its answer written to the edited task (review 7, finding 6): the claim fails, the chunk
-- is built again. Ids are an identity, never reused: a row deleted and inserted again is
-- another id. batchd itself never updates either column: a BEFORE UPDATE OF trigger is not
-- even called for its statements.
ALTER TABLE tasks ADD COLUMN revision integer NOT NULL DEFAULT 0;

-- SET search_path FROM CURRENT: it runs in the session of whoever updates `tasks` (a
-- user's psql too), whose search_path may not include batchd's schema.
CREATE FUNCTION batchd_tasks_revised() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_revised BEFORE UPDATE OF params, custom_id ON tasks
    FOR EACH ROW
    WHEN (OLD.params IS DISTINCT FROM NEW.params OR OLD.custom_id IS DISTINCT FROM NEW.custom_id)
    EXECUTE FUNCTION batchd_tasks_revised();
