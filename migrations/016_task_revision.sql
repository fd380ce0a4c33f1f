-- batchd schema v16: a task whose request a user changes (an UPDATE of its params or its
-- custom_id) is a new request (review 7, findings 1 and 6).
--
-- tasks.revision moves on with each such change. The chunker builds a body from the rows
-- it read; the claim (record_intent) takes a task only at the revision read, so a request
-- edited between the read and the claim is never sent from its old text, nor its answer
-- written to the edited task: the claim fails, the chunk is built again. A row deleted and
-- inserted again can take the deleted row's id on SQLite (INTEGER PRIMARY KEY without
-- AUTOINCREMENT gives max(id) + 1), with revision 0: the claim compares created_at too
-- (store/sqlite/tasks.py), and a row inserted after the read was created after it (the
-- same millisecond as the first row's insert and the read aside).
--
-- The same change ends the task's membership (batch_tasks) of every batch, as `batchd
-- retry` does of those that may still answer its old request (store/sqlite/operations.py): a batch in
-- flight, a candidate, an intent watched for a late batch (whose members a candidate
-- copies); of all of them here, so the trigger names no column of `batches` (a migration
-- may rebuild them). Their line for it is then kept as unmatched, never written to it; a
-- task still `submitted` is requeued when its batch finishes without a line for it, and
-- sent again.
--
-- batchd itself never sets either column: an UPDATE OF trigger fires only for a statement
-- that sets one of them, so it costs batchd's own statements nothing.
ALTER TABLE tasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER tasks_revised AFTER UPDATE OF params, custom_id ON tasks
WHEN NEW.params IS NOT OLD.params OR NEW.custom_id IS NOT OLD.custom_id
BEGIN
    UPDATE tasks SET revision = OLD.revision + 1 WHERE id = NEW.id;
    DELETE FROM batch_tasks WHERE task_id = NEW.id;
END;
