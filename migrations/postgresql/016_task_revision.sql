-- batchd schema v16 (PostgreSQL): a task whose request a user changes (an UPDATE of its
-- params or its custom_id) is a new request (review 7, findings 1 and 6).
--
-- tasks.revision moves on with each such change. The chunker builds a body from the rows
-- it read; the claim (record_intent) takes a task only at the revision read, so a request
-- edited between the read and the claim is never sent from its old text, nor its answer
-- written to the edited task: the claim fails, the chunk is built again. Ids are an
-- identity, never reused: a row deleted and inserted again is another id.
--
-- The same change ends the task's membership (batch_tasks) of every batch, as `batchd
-- retry` does of those that may still answer its old request (store/postgres/operations.py): a batch in
-- flight, a candidate, an intent watched for a late batch (whose members a candidate
-- copies); of all of them here, so the trigger names no column of `batches` (a migration
-- may rebuild them). Their line for it is then kept as unmatched, never written to it; a
-- task still `submitted` is requeued when its batch finishes without a line for it, and
-- sent again.
--
-- batchd itself never sets either column: a BEFORE UPDATE OF trigger is not even called
-- for its statements.
ALTER TABLE tasks ADD COLUMN revision integer NOT NULL DEFAULT 0;

-- SECURITY DEFINER: whoever may UPDATE a task's params may have no right on batch_tasks;
-- the function runs as its owner, batchd's role, with the search_path fixed when it was
-- created, so a caller's path cannot redirect it.
CREATE FUNCTION batchd_tasks_revised() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    DELETE FROM batch_tasks WHERE task_id = NEW.id;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_revised BEFORE UPDATE OF params, custom_id ON tasks
    FOR EACH ROW
    WHEN (OLD.params IS DISTINCT FROM NEW.params OR OLD.custom_id IS DISTINCT FROM NEW.custom_id)
    EXECUTE FUNCTION batchd_tasks_revised();
