-- batchd schema v15: tasks.revision, moved on whenever a user changes a task's request
-- (its params or its custom_id) with an UPDATE. The chunker builds a body from the rows it
-- read; the claim (record_intent) takes a task only at the revision read, so a request
-- edited between the read and the claim is never sent from its old text, nor its answer
-- written to the edited task (review 7, finding 6): the claim fails, the chunk is built
-- again. batchd itself never updates either column: the trigger costs its statements
-- nothing (an UPDATE OF trigger fires only for a statement that sets one of them).
--
-- A row deleted and inserted again can take the deleted row's id on SQLite (INTEGER
-- PRIMARY KEY without AUTOINCREMENT gives max(id) + 1), with revision 0: the claim compares
-- created_at too (store/sqlite/tasks.py), and a row inserted after the read was created
-- after it (the same millisecond as the first row's insert and the read aside).
ALTER TABLE tasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER tasks_revised AFTER UPDATE OF params, custom_id ON tasks
WHEN NEW.params IS NOT OLD.params OR NEW.custom_id IS NOT OLD.custom_id
BEGIN
    UPDATE tasks SET revision = OLD.revision + 1 WHERE id = NEW.id;
END;
