"""A user's change to a task between the staging of its batch's line and the apply (review 8):
the answer to the old request never reaches the new one, a paid line is never lost, and a
batch whose tasks were all renamed in flight is still ours. On both stores (real SQLite
files, a real PostgreSQL schema per test), through the lanes the collector uses.

- An edit of the task's params (migration 016's trigger ends its membership): the staged
  line is not written; it is kept as a duplicate and counted; the task stays `submitted`
  and is requeued, with its new params, when the batch finishes.
- A DELETE of the task, or a rename of its custom_id: the staged line is kept as unmatched
  (as the API sent it) and its billed usage counted, once even if downloaded again.
- A batch whose tasks' custom_ids were all renamed: its lines name no task any more, which
  proves nothing foreign: its lines stay kept and counted, its tasks are requeued.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchd.domain import BatchOrigin
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.store import add_tasks, api_batch, claim
from tests.test_ledger_store import MAX_ATTEMPTS, kept, ledger, paid, times

pytestmark = [pytest.mark.fake_clock, pytest.mark.both_stores]
EDITED = {"edited": True}


def as_json(value: Any) -> Any:
    """A JSON column as Python: SQLite gives its text, PostgreSQL may decode it already."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def kept_line(peek: Peek, table: str, custom_id: str) -> dict[str, Any]:
    [(line,)] = peek.query(f"SELECT line FROM {table} WHERE custom_id = '{custom_id}'")
    found = as_json(line)
    assert isinstance(found, dict)
    return found


async def staged_then(store: Store, peek: Peek, change: str) -> tuple[int, Any]:
    """Tasks a and b in a batch whose lines (paid, `from` the batch) are staged, then the
    user's `change`, then the apply, on one lane as the collector does."""
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_1", "ended"))
    async with store.write_back_lane() as lane:
        staged = await lane.stage_results(intent, [paid("a", "old"), paid("b", "old")])
        assert (staged.staged, staged.unmatched) == (2, ())
        peek.execute(change)
        applied = await lane.apply_staged(intent, MAX_ATTEMPTS, max_rows=100)
        assert applied is not None
        assert await lane.apply_staged(intent, MAX_ATTEMPTS, 100, applied.last_task_id) is None
    return intent, applied.report


async def test_an_edit_between_stage_and_apply_never_gets_the_old_answer(
    store: Store, peek: Peek
) -> None:
    intent, report = await staged_then(
        store, peek, "UPDATE tasks SET params = '{\"edited\": true}' WHERE custom_id = 'a'"
    )
    assert (report.written, report.requeued, report.duplicates, report.unmatched) == (1, 0, 1, ())
    a = peek.task("a")
    assert (a["status"], a["result"], as_json(a["params"])) == ("submitted", None, EDITED)
    assert peek.task("b")["status"] == "succeeded"
    # The old request's answer was paid: kept aside as a duplicate, counted once.
    assert kept_line(peek, "duplicate_results", "a")["result"]["from"] == "old"
    assert ledger(peek) == times(2)
    finished = await store.finish_batch(intent, "no line", matched_lines=2)
    assert finished.missing_requeued == ("a",)
    assert finished.origin == BatchOrigin.OURS
    a = peek.task("a")
    assert (a["status"], a["batch_id"], as_json(a["params"])) == ("pending", None, EDITED)
    # Sent again with its new params: the next claim takes it.
    assert [t.custom_id async for t in store.iter_pending()] == ["a"]
    assert await claim(store, "a") != intent
    assert ledger(peek) == times(2)


async def test_a_delete_between_stage_and_apply_keeps_the_paid_line(
    store: Store, peek: Peek
) -> None:
    intent, report = await staged_then(store, peek, "DELETE FROM tasks WHERE custom_id = 'a'")
    assert (report.written, report.ignored, report.duplicates, report.unmatched) == (
        1,
        0,
        0,
        ("a",),
    )
    line = kept_line(peek, "unmatched_results", "a")
    assert (line["custom_id"], line["result"]["from"]) == ("a", "old")
    assert ledger(peek) == times(2)
    # Downloaded again (a collector restarted): now unmatched when staged, kept by the
    # collector as any unmatched line; still one line, counted once.
    lines = [paid("a", "old"), paid("b", "old")]
    report = await store.write_results(intent, lines, MAX_ATTEMPTS)
    assert report.unmatched == ("a",)
    await store.keep_unmatched("msgbatch_1", [kept(lines[0])])
    assert peek.query("SELECT count(*) FROM unmatched_results")[0][0] == 1
    assert ledger(peek) == times(2)
    finished = await store.finish_batch(intent, "no line", matched_lines=2)
    assert (finished.origin, finished.missing_requeued) == (BatchOrigin.PARTLY_OURS, ())
    assert ledger(peek) == times(2)


async def test_a_rename_between_stage_and_apply_keeps_the_paid_line_and_requeues(
    store: Store, peek: Peek
) -> None:
    intent, report = await staged_then(
        store, peek, "UPDATE tasks SET custom_id = 'a-v2' WHERE custom_id = 'a'"
    )
    assert (report.written, report.ignored, report.unmatched) == (1, 0, ("a",))
    renamed = peek.task("a-v2")
    assert (renamed["status"], renamed["result"]) == ("submitted", None)
    assert kept_line(peek, "unmatched_results", "a")["result"]["from"] == "old"
    assert ledger(peek) == times(2)
    finished = await store.finish_batch(intent, "no line", matched_lines=2)
    assert (finished.origin, finished.missing_requeued) == (BatchOrigin.PARTLY_OURS, ("a-v2",))
    assert peek.task("a-v2")["status"] == "pending"
    assert ledger(peek) == times(2)


async def test_a_batch_whose_tasks_were_all_renamed_in_flight_is_ours(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_ours", "ended"))
    peek.execute("UPDATE tasks SET custom_id = custom_id || '-v2'")  # the user's rename
    lines = [paid("a", "ours"), paid("b", "ours")]
    report = await store.write_results(intent, lines, MAX_ATTEMPTS)
    assert report.unmatched == ("a", "b")
    await store.keep_unmatched("msgbatch_ours", [kept(o) for o in lines])
    assert ledger(peek) == times(2)
    finished = await store.finish_batch(intent, "no line", matched_lines=0)
    assert finished.origin == BatchOrigin.PARTLY_OURS
    assert finished.missing_requeued == ("a-v2", "b-v2")
    # Its paid lines stay kept and counted; the key is not on record as shared.
    assert peek.query("SELECT count(*) FROM unmatched_results")[0][0] == 2
    assert peek.query("SELECT count(*) FROM foreign_batches")[0][0] == 0
    assert ledger(peek) == times(2)
    assert [peek.task(c)["attempts"] for c in ("a-v2", "b-v2")] == [1, 1]


async def test_a_batch_naming_none_of_its_unchanged_tasks_is_still_foreign(
    store: Store, peek: Peek
) -> None:
    """The rule above needs every task changed: one left as it was, whose line would have
    come, makes a batch of strangers' lines foreign as before."""
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_theirs", "ended"))
    peek.execute("UPDATE tasks SET custom_id = 'a-v2' WHERE custom_id = 'a'")
    lines = [paid("x", "theirs"), paid("y", "theirs")]
    report = await store.write_results(intent, lines, MAX_ATTEMPTS)
    await store.keep_unmatched("msgbatch_theirs", [kept(o) for o in lines])
    assert report.unmatched == ("x", "y")
    finished = await store.finish_batch(intent, "no line", matched_lines=0)
    assert finished.origin == BatchOrigin.FOREIGN
    assert peek.query("SELECT count(*) FROM foreign_batches")[0][0] == 1
    assert ledger(peek) == times(0)
