"""The store's contract for collecting and polling (interface.py, "Several daemons"), on
both stores: an ended batch taken under a lease, renewed, given back, finished by its
holder; in-flight batches due for a poll. What only several daemons can show (another
holder, a lapsed lease, a claimed poll) is in test_postgres_collection_lease.py."""

from __future__ import annotations

import pytest

from batchd.domain import BatchState
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.store import add_tasks, api_batch, claim, outcome, submitted_batch

pytestmark = pytest.mark.both_stores
LEASE_S = 30.0


async def test_the_oldest_ended_batch_is_taken_first_and_skip_passes_over_the_ones_named(
    store: Store,
) -> None:
    first = await submitted_batch(store, "msgbatch_a", "a1", "a2")
    second = await submitted_batch(store, "msgbatch_b", "b1")
    taken = await store.take_ended_batch("daemon-1", LEASE_S)
    assert taken is not None
    assert (taken.batch.local_id, taken.batch.api_batch_id) == (first, "msgbatch_a")
    assert taken.batch.state is BatchState.ENDED
    assert taken.taken_over_from is None
    after = await store.take_ended_batch("daemon-1", LEASE_S, {first})
    assert after is not None
    assert after.batch.local_id == second
    assert await store.take_ended_batch("daemon-1", LEASE_S, {first, second}) is None


async def test_no_ended_batch_means_nothing_to_take(store: Store) -> None:
    await add_tasks(store, "c1")
    local_id = await claim(store, "c1")
    assert await store.mark_created(local_id, api_batch("msgbatch_c"))  # still in progress
    assert await store.take_ended_batch("daemon-1", LEASE_S) is None


async def test_the_holder_renews_and_finishes_and_then_holds_nothing(
    store: Store, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_d", "d1", "d2")
    assert await store.take_ended_batch("daemon-1", LEASE_S) is not None
    assert await store.renew_collection(local_id, "daemon-1", LEASE_S)
    await store.write_results(local_id, [outcome("d1")], max_attempts=3)
    report = await store.finish_batch(local_id, "no line", matched_lines=1, holder="daemon-1")
    assert not report.lease_lapsed
    assert report.missing_requeued == ("d2",)  # the holder's finish settles the intent
    assert peek.query("SELECT state FROM batches WHERE id = ?", local_id) == [("completed",)]
    # A completed batch is nobody's to renew or take.
    assert not await store.renew_collection(local_id, "daemon-1", LEASE_S)
    assert await store.take_ended_batch("daemon-1", LEASE_S) is None


async def test_a_batch_given_back_is_taken_again(store: Store) -> None:
    local_id = await submitted_batch(store, "msgbatch_e", "e1")
    assert await store.take_ended_batch("daemon-1", LEASE_S) is not None
    await store.give_back_collection(local_id, "daemon-1")
    again = await store.take_ended_batch("daemon-1", LEASE_S)
    assert again is not None
    assert again.batch.local_id == local_id
    assert again.taken_over_from is None  # given back, not lapsed: no take-over


async def test_a_holders_own_lease_not_in_skip_is_taken_again_at_once(store: Store) -> None:
    """A collection of this daemon that stopped without giving its lease back (the database
    went away under it): the batch is its own to take again at once, not after the lease
    runs out; `skip` (the batches it is collecting) still passes over it."""
    local_id = await submitted_batch(store, "msgbatch_own", "o1")
    assert await store.take_ended_batch("daemon-1", LEASE_S) is not None
    assert await store.take_ended_batch("daemon-1", LEASE_S, {local_id}) is None
    again = await store.take_ended_batch("daemon-1", LEASE_S)
    assert again is not None
    assert (again.batch.local_id, again.taken_over_from) == (local_id, None)
    assert await store.renew_collection(local_id, "daemon-1", LEASE_S)


async def test_a_finish_without_a_holder_is_not_guarded_by_any_lease(store: Store) -> None:
    local_id = await submitted_batch(store, "msgbatch_f", "f1")
    await store.write_results(local_id, [outcome("f1")], max_attempts=3)
    report = await store.finish_batch(local_id, "no line", matched_lines=1)
    assert (report.missing_requeued, report.lease_lapsed) == ((), False)
    # Replayed: a no-op, and not a lapsed lease either.
    again = await store.finish_batch(local_id, "no line", matched_lines=1, holder="daemon-1")
    assert (again.missing_requeued, again.lease_lapsed) == ((), False)


async def test_every_in_flight_batch_is_due_for_its_first_poll(store: Store) -> None:
    await add_tasks(store, "g1", "g2", "g3")
    polled = []
    for n in (1, 2):
        local_id = await claim(store, f"g{n}")
        assert await store.mark_created(local_id, api_batch(f"msgbatch_g{n}"))
        polled.append(local_id)
    await claim(store, "g3")  # creating: not the poller's
    ended = await submitted_batch(store, "msgbatch_h", "h1")
    due = await store.batches_due_for_poll(30.0)
    assert [batch.local_id for batch in due] == polled
    assert ended not in [batch.local_id for batch in due]


@pytest.mark.sqlite_only
async def test_sqlite_holds_no_liveness_lock_and_writes_nothing_of_a_lease(
    store: Store, peek: Peek
) -> None:
    """One daemon per file (its file lock): the liveness context holds nothing, and a take
    and a renewal inside it write nothing, the liveness flag included (schema 15)."""
    local_id = await submitted_batch(store, "msgbatch_l", "l1")
    async with store.collector_liveness("daemon-1"):
        taken = await store.take_ended_batch("daemon-1", LEASE_S)
        assert taken is not None
        assert (taken.taken_over_from, taken.holder_gone) == (None, False)
        assert await store.renew_collection(local_id, "daemon-1", LEASE_S)
    assert peek.query(
        "SELECT collector, collect_lease_until, collector_lock_held FROM batches WHERE id = ?",
        local_id,
    ) == [(None, None, 0)]
