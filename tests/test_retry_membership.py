"""A task the user retried is a new request: no batch of its old request answers it.

A retry ends the task's membership in every batch that may still be read for its old
request (its own batches in flight, candidates of its intents, intents still watched for
a late batch): a late line of those batches is kept (unmatched, or a duplicate when it was
staged before the retry), never written to the task, never lost. A task requeued by
batchd itself (same request) still takes a candidate's answer (tests/test_harvest.py).
On both stores (real SQLite files, a real PostgreSQL schema per test), no mocks.
"""

from __future__ import annotations

import orjson
import pytest

from batchd.domain import BatchOrigin, BatchState, Outcome, TaskStatus
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.store import START, add_tasks, answer, api_batch, claim

pytestmark = [pytest.mark.fake_clock, pytest.mark.both_stores]
MAX_ATTEMPTS = 3
CHANGED = '{"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}'


def line(custom_id: str, source: str) -> Outcome:
    return answer(custom_id, source)


def source_of(peek: Peek, custom_id: str) -> str | None:
    result = peek.task(custom_id)["result"]
    return None if result is None else str(orjson.loads(result)["from"])


async def candidate_of(store: Store, intent_id: int, api_id: str) -> int:
    """Record `api_id` as an ended candidate of the intent; its local id."""
    assert await store.record_candidate(intent_id, api_batch(api_id, "ended"), "found late")
    [row] = [b for b in await store.batches_in(BatchState.ENDED) if b.api_batch_id == api_id]
    return row.local_id


async def answered_after_a_lost_create(store: Store, *custom_ids: str) -> tuple[int, int]:
    """The reviewer's start: a create whose outcome stayed unknown is released (watched),
    the requests go out again in a batch that answers them. (intent, resubmitted batch)."""
    await add_tasks(store, *custom_ids)
    intent = await claim(store, *custom_ids)
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    resubmitted = await claim(store, *custom_ids)
    assert await store.mark_created(resubmitted, api_batch("msgbatch_again", "ended"))
    lines = [line(cid, "old request") for cid in custom_ids]
    report = await store.write_results(resubmitted, lines, MAX_ATTEMPTS)
    assert report.written == len(custom_ids)
    assert (await store.finish_batch(resubmitted, "none", matched_lines=2)).missing_requeued == ()
    return intent, resubmitted


async def test_a_candidate_never_answers_a_task_retried_with_new_params(
    store: Store, peek: Peek
) -> None:
    # Review 7, finding 1: the late batch of the first create is found; the user then
    # changes a task's params and retries it; it is claimed for the new request.
    intent, _ = await answered_after_a_lost_create(store, "a", "b")
    late = await candidate_of(store, intent, "msgbatch_late")
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'a'", CHANGED)
    assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
    fresh = await claim(store, "a")

    report = await store.write_results(
        late, [line("a", "old request"), line("b", "old request")], MAX_ATTEMPTS
    )
    # a's old answer is not written to it: a line of no member of this batch any more,
    # kept by the caller (the collector) as unmatched; b's is a duplicate, as before.
    assert (report.written, report.duplicates, report.unmatched) == (0, 1, ("a",))
    await store.keep_unmatched("msgbatch_late", [("a", '{"custom_id": "a"}')])
    assert (peek.task("a")["status"], peek.task("a")["batch_id"]) == ("submitted", fresh)

    assert await store.mark_created(fresh, api_batch("msgbatch_fresh", "ended"))
    again = await store.write_results(fresh, [line("a", "new request")], MAX_ATTEMPTS)
    assert again.written == 1
    assert (peek.task("a")["status"], peek.task("a")["batch_id"]) == ("succeeded", fresh)
    assert source_of(peek, "a") == "new request"

    # The candidate is still ours (its line names a task of ours), its line still kept.
    assert (await store.finish_batch(late, "none", matched_lines=1)).missing_requeued == ()
    [candidate] = await store.candidate_batches()
    assert candidate.origin == BatchOrigin.PARTLY_OURS
    assert peek.query("SELECT api_batch_id, custom_id FROM unmatched_results") == [
        ("msgbatch_late", "a")
    ]
    assert peek.query("SELECT custom_id FROM duplicate_results") == [("b",)]


async def test_a_candidate_never_withdraws_a_retried_task_from_the_queue(
    store: Store, peek: Peek
) -> None:
    intent, _ = await answered_after_a_lost_create(store, "a", "b")
    late = await candidate_of(store, intent, "msgbatch_late")
    assert await store.retry_tasks([TaskStatus.SUCCEEDED]) == 2  # both, still pending

    report = await store.write_results(late, [line("a", "old request")], MAX_ATTEMPTS)
    assert (report.written, report.unmatched) == (0, ("a",))
    assert peek.task("a")["status"] == "pending"
    assert [t.custom_id async for t in store.iter_pending()] == ["a", "b"]


async def test_a_candidate_found_after_a_retry_does_not_carry_the_retried_task(
    store: Store, peek: Peek
) -> None:
    # The intent is still watched when the user retries: the late batch found afterwards
    # copies the intent's members, which no longer include the retried task.
    intent, _ = await answered_after_a_lost_create(store, "a", "b")
    assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
    late = await candidate_of(store, intent, "msgbatch_late")

    report = await store.write_results(
        late, [line("a", "old request"), line("b", "old request")], MAX_ATTEMPTS
    )
    assert (report.written, report.duplicates, report.unmatched) == (0, 1, ("a",))
    assert peek.task("a")["status"] == "pending"


async def test_a_line_of_an_earlier_batch_in_flight_is_kept_when_its_task_was_retried(
    store: Store, peek: Peek
) -> None:
    # a waits in its resubmission when the late batch of its first create answers it;
    # the user retries it; the resubmission's line then comes: not the new request's
    # answer, and paid for: kept, not silently ignored.
    await add_tasks(store, "a")
    intent = await claim(store, "a")
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    resubmitted = await claim(store, "a")
    assert await store.mark_created(resubmitted, api_batch("msgbatch_again", "ended"))
    late = await candidate_of(store, intent, "msgbatch_late")
    assert (await store.write_results(late, [line("a", "late")], MAX_ATTEMPTS)).written == 1
    assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
    fresh = await claim(store, "a")

    report = await store.write_results(resubmitted, [line("a", "again")], MAX_ATTEMPTS)
    assert (report.written, report.ignored, report.unmatched) == (0, 0, ("a",))
    assert (peek.task("a")["status"], peek.task("a")["batch_id"]) == ("submitted", fresh)


async def test_a_line_staged_before_the_retry_is_kept_as_a_duplicate_not_written(
    store: Store, peek: Peek
) -> None:
    # The candidate's lines are staged while a is still a member (answered already); the
    # user retries it before the apply: the apply must not write the old answer to it.
    intent, _ = await answered_after_a_lost_create(store, "a", "b")
    late = await candidate_of(store, intent, "msgbatch_late")
    async with store.write_back_lane() as lane:
        await lane.clear_staging()
        staged = await lane.stage_results(late, [line("a", "late"), line("b", "late")])
        assert staged.unmatched == ()
        assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
        applied = await lane.apply_staged(late, MAX_ATTEMPTS, 100)
        await lane.clear_staging()
    assert applied is not None
    assert (applied.report.written, applied.report.duplicates) == (0, 2)
    assert (peek.task("a")["status"], peek.task("a")["result"]) == ("pending", None)
    kept = peek.query("SELECT custom_id FROM duplicate_results ORDER BY custom_id")
    assert kept == [("a",), ("b",)]


async def test_a_candidate_never_answers_a_waiting_task_whose_params_the_user_changed(
    store: Store, peek: Peek
) -> None:
    # Requeued by batchd (its create's outcome unknown), a may take a late batch's answer:
    # the same request. Once the user corrects its params it is a new request (015's
    # trigger), and the late batch's line for it is kept, not written; b's is written.
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    late = await candidate_of(store, intent, "msgbatch_late")
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'a'", CHANGED)

    report = await store.write_results(
        late, [line("a", "old request"), line("b", "old request")], MAX_ATTEMPTS
    )
    assert (report.written, report.unmatched) == (1, ("a",))
    assert (peek.task("a")["status"], peek.task("b")["status"]) == ("pending", "succeeded")
    assert [t.custom_id async for t in store.iter_pending()] == ["a"]


async def test_a_batch_in_flight_never_answers_its_task_with_the_old_params(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    batch = await claim(store, "a", "b")
    assert await store.mark_created(batch, api_batch("msgbatch_own", "ended"))
    peek.execute("UPDATE tasks SET params = ? WHERE custom_id = 'a'", CHANGED)

    report = await store.write_results(
        batch, [line("a", "old request"), line("b", "old request")], MAX_ATTEMPTS
    )
    assert (report.written, report.unmatched) == (1, ("a",))
    await store.keep_unmatched("msgbatch_own", [("a", '{"custom_id": "a"}')])
    # The batch ends with no line written to a: it goes out again, with its new params;
    # paying twice is on record (missing_results, and the kept line).
    finished = await store.finish_batch(batch, "no line for it", matched_lines=1)
    assert finished.missing_requeued == ("a",)
    assert finished.origin == BatchOrigin.PARTLY_OURS
    assert (peek.task("a")["status"], peek.task("a")["result"]) == ("pending", None)
    assert [t.params async for t in store.iter_pending()] == [peek.task("a")["params"]]


async def test_a_retry_moves_the_revision_on_and_the_task_is_claimed_at_it(
    store: Store, peek: Peek
) -> None:
    # A new request, as an edit makes one: a PostgreSQL apply that waited for the row while
    # the retry committed checks the revision on the row (tests/test_postgres_apply_race.py).
    await add_tasks(store, "a")
    local = await claim(store, "a")
    assert await store.mark_created(local, api_batch("msgbatch_1", "ended"))
    assert (await store.write_results(local, [line("a", "first")], MAX_ATTEMPTS)).written == 1
    assert peek.task("a")["revision"] == 0
    assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
    assert peek.task("a")["revision"] == 1
    [pending] = [t async for t in store.iter_pending()]
    assert await store.record_intent([pending.id], 1000, [pending.version]) is not None
    assert (peek.task("a")["status"], peek.task("a")["attempts"]) == ("submitted", 1)
