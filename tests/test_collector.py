"""The collector: results staged, then applied in task-id ranges; short streams, transport
failures and archived results, against a results server on loopback and real SQLite files."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

import batchd.store.sqlite.staging
import batchd.store.sqlite.store
from batchd.api import AuthenticationError
from batchd.cli.commands import render_status, status_snapshot
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.metrics import RESULTS_WRITTEN, Registry
from batchd.store import AppliedRange, StageReport, Store, StoreError
from batchd.store.sqlite import SqliteStore, SqliteWriteBackLane
from tests.support.collector import ApiStub, answers, collect, ended_batch, line, serving
from tests.support.crash_harness import (
    RunLog,
    assert_nothing_lost_or_duplicated,
    check_invariants,
    enqueue,
    run_daemon,
    write_config,
)
from tests.support.store import START, FakeClock, add_tasks, api_batch, claim, outcome, query

pytestmark = pytest.mark.fake_clock  # the store runs on `clock`, at START


@pytest.fixture
async def api() -> AsyncIterator[ApiStub]:
    stub = ApiStub()

    async def results(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        stub.hits[name] = stub.hits.get(name, 0) + 1
        status = stub.statuses.get(name, 200)
        if status != 200:
            error = {"type": "not_found_error" if status == 404 else "api_error", "message": "x"}
            return web.json_response({"type": "error", "error": error}, status=status)
        return web.Response(body=stub.bodies[name])

    async def retrieve(request: web.Request) -> web.Response:
        batch = stub.batches.get(request.match_info["id"])
        if batch is None:
            error = {"type": "not_found_error", "message": "no such batch"}
            return web.json_response({"type": "error", "error": error}, status=404)
        return web.json_response(batch)

    async with serving(stub, results, retrieve):
        yield stub


# -- staging, then applying in ranges -----------------------------------------------------------


async def test_a_shuffled_20k_batch_lands_each_result_on_its_own_task(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock
) -> None:
    # Two batches whose tasks interleave in the table: every apply range of batch A spans
    # rowids of batch B, whose tasks must stay untouched.
    ids_a = [f"a-{n}" for n in range(20_000)]
    ids_b = [f"b-{n}" for n in range(500)]
    await add_tasks(store, *(cid for pair in zip(ids_a[:500], ids_b, strict=True) for cid in pair))
    await add_tasks(store, *ids_a[500:])
    local_a = await claim(store, *ids_a)
    await claim(store, *ids_b)
    assert await store.mark_created(local_a, api_batch("msgbatch_a", "ended"))
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE batches SET results_url = ? WHERE id = ?", (api.url("a"), local_a))
    conn.close()
    lines = [line(cid) for cid in ids_a] + [line("b-3"), line("nobody")]
    random.Random(6).shuffle(lines)
    lines.append(line("a-7", "a second, different line for a-7"))  # in a later chunk: ignored
    api.bodies["a"] = b"\n".join(lines) + b"\n"
    registry = Registry([RESULTS_WRITTEN])

    with capture_logs() as logs:
        assert await collect(store, api, clock, registry, chunk_size=1500) == 1

    got = answers(db_path)
    assert all(got[cid] == ("succeeded", f"answer for {cid}") for cid in ids_a)
    assert {got[cid] for cid in ids_b} == {("submitted", None)}
    assert sorted(e["first"] for e in logs if e["event"] == "results_unmatched") == [
        "b-3",
        "nobody",
    ]
    kept = dict(query(db_path, "SELECT custom_id, line FROM unmatched_results"))
    assert set(kept) == {"b-3", "nobody"}
    assert orjson.loads(kept["nobody"]) == orjson.loads(line("nobody"))
    outcomes = ("written", "requeued", "ignored", "unmatched")
    counts = {name: registry.value(RESULTS_WRITTEN, outcome=name) for name in outcomes}
    assert counts == {"written": 20_000, "requeued": 0, "ignored": 1, "unmatched": 2}
    assert query(db_path, "SELECT state FROM batches WHERE id = ?", (local_a,)) == [("completed",)]


async def test_staging_takes_no_write_lock_and_changes_no_task_until_applied(
    store: Store, db_path: Path
) -> None:
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", "a", "b", "c")

    async def stage_while_a_user_inserts(db: Any) -> StageReport:
        lane = SqliteWriteBackLane(store.database, store.database.main)
        report = await lane.stage(db, local_id, [outcome("c"), outcome("a"), outcome("zz")])
        # Inside the staging transaction: a user's write must not wait at all.
        with sqlite3.connect(db_path, timeout=0) as conn:
            conn.execute("INSERT INTO tasks (custom_id, params) VALUES ('user-1', '{}')")
        conn.close()
        return report

    staged = await store.database.shielded(
        "staging", store.database.main, stage_while_a_user_inserts
    )
    assert (staged.staged, staged.repeated, staged.unmatched) == (2, 0, (2,))
    assert query(db_path, "SELECT status FROM tasks WHERE custom_id = 'a'") == [("submitted",)]
    first = await store.apply_staged(local_id, 3, max_rows=1)
    assert first is not None
    assert (first.report.written, first.report.ignored) == (1, 0)
    second = await store.apply_staged(local_id, 3, max_rows=1, after_task_id=first.last_task_id)
    assert second is not None
    assert second.report.written == 1
    assert await store.apply_staged(local_id, 3, 1, second.last_task_id) is None
    await store.clear_staging()
    assert await store.apply_staged(local_id, 3, 10) is None


async def test_a_restart_between_staging_and_applying_downloads_again_harmlessly(
    db_path: Path, api: ApiStub, clock: FakeClock
) -> None:
    ids = [f"t-{n}" for n in range(50)]
    api.bodies["1"] = b"\n".join(line(cid) for cid in reversed(ids))
    store = await SqliteStore.open(db_path, clock=clock)
    local_id = await ended_batch(store, db_path, api, "1", *ids)
    await store.stage_results(local_id, [outcome(cid) for cid in ids[:30]])
    first = await store.apply_staged(local_id, 3, max_rows=10)  # one range, then the "crash"
    assert first is not None
    assert first.report.written == 10
    await store.close()  # the staging database goes with the connection, as with kill -9

    store = await SqliteStore.open(db_path, clock=clock)
    registry = Registry([RESULTS_WRITTEN])
    try:
        assert await collect(store, api, clock, registry, chunk_size=7) == 1
    finally:
        await store.close()
    outcomes = ("written", "ignored", "unmatched")
    counts = {name: registry.value(RESULTS_WRITTEN, outcome=name) for name in outcomes}
    assert counts == {"written": 40, "ignored": 10, "unmatched": 0}
    got = answers(db_path)
    # The first range kept what was applied before the "crash"; the rest came from the
    # download after it, each line on its own task.
    assert {got[cid] for cid in ids[:10]} == {("succeeded", None)}
    assert all(got[cid] == ("succeeded", f"answer for {cid}") for cid in ids[10:])


async def test_kill_after_staging_before_applying_then_restart_pays_nothing_twice(
    tmp_path: Path,
) -> None:
    async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=0.2, seed=3)) as fake:
        setup = write_config(tmp_path, fake.base_url)
        await enqueue(setup, 12)
        log = RunLog()
        for point in ("results_staged:1", "results_staged:2", "results_chunk_written:2"):
            run = await run_daemon(setup, log, crash_at=point)
            assert run.killed, (point, run.returncode, run.stderr[-2000:])
            assert run.crash_point == point
        final = await run_daemon(setup, log)
        assert final.returncode == 0, final.stderr[-2000:]
        ledger = check_invariants(setup.db_path, fake)
    assert_nothing_lost_or_duplicated(ledger, 12)
    assert ledger.submissions == 12  # every batch's results were downloaded again, not resent


# -- short streams and transport failures --------------------------------------------------------


async def test_transport_failures_do_not_count_toward_finishing_a_short_stream(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock
) -> None:
    local_id = await ended_batch(store, db_path, api, "1", "a", "b", "c")
    api.statuses["1"] = 500
    for _ in range(3):
        assert await collect(store, api, clock, max_download_attempts=2) == 0
    assert query(db_path, "SELECT download_attempts, short_downloads FROM batches") == [(3, 0)]

    api.statuses["1"] = 200
    api.bodies["1"] = line("a") + b"\n" + line("b") + b"\n"  # whole, but one line short
    assert await collect(store, api, clock, max_download_attempts=2) == 0
    assert answers(db_path)["c"] == ("submitted", None)  # downloaded again, not requeued
    assert query(db_path, "SELECT state, short_downloads FROM batches") == [("ended", 1)]

    assert await collect(store, api, clock, max_download_attempts=2) == 1
    assert answers(db_path)["c"] == ("pending", None)  # the second short stream: missing
    assert query(db_path, "SELECT custom_id FROM missing_results") == [("c",)]
    assert query(
        db_path, "SELECT state, download_attempts FROM batches WHERE id = ?", (local_id,)
    ) == [("completed", 5)]


# -- results gone: archived, or a transient 404 -------------------------------------------------


def api_object(api_id: str, archived_at: str | None) -> dict[str, Any]:
    return {**api_batch(api_id, "ended"), "archived_at": archived_at}


async def test_archived_results_finish_the_batch_and_requeue_loudly(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock
) -> None:
    await ended_batch(store, db_path, api, "1", "a", "b", "c")
    api.statuses["1"] = 404
    api.batches["1"] = api_object("1", "2026-12-23T15:40:38.500000+00:00")

    with capture_logs() as logs:
        assert await collect(store, api, clock) == 1

    [archived] = [e for e in logs if e["event"] == "results_archived"]
    assert archived["log_level"] == "error"
    assert (archived["requests"], archived["requeued"], archived["first"]) == (3, 3, "a")
    assert {status for status, _ in answers(db_path).values()} == {"pending"}
    assert query(db_path, "SELECT state FROM batches") == [("completed",)]
    # Paid for once already, and sent again: `batchd status` says so, apart from lines
    # missing from a whole stream.
    assert query(
        db_path, "SELECT api_batch_id, custom_id, reason FROM missing_results ORDER BY custom_id"
    ) == [("1", "a", "archived"), ("1", "b", "archived"), ("1", "c", "archived")]
    snapshot = await status_snapshot(store)
    assert snapshot["results"] == {"unmatched": 0, "missing_requeued": 0, "archived_requeued": 3}
    assert "ARCHIVED RESULTS: 3 request(s) of batches whose results were archived" in (
        render_status(snapshot)
    )


async def test_a_results_404_of_a_young_batch_is_retried_and_an_old_one_is_archived(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock
) -> None:
    await ended_batch(store, db_path, api, "1", "a")
    api.statuses["1"] = 404
    api.batches["1"] = api_object("1", None)  # §7.6: a transient 404 right after the end
    for _ in range(12):
        assert await collect(store, api, clock) == 0
    assert answers(db_path)["a"] == ("submitted", None)
    assert query(db_path, "SELECT state, download_attempts FROM batches") == [("ended", 12)]

    del api.batches["1"]  # the batch itself is gone too: only its age can tell
    clock.now = START + timedelta(days=28)
    with capture_logs() as logs:
        assert await collect(store, api, clock) == 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["results_near_archival"]
    clock.now = START + timedelta(days=29, seconds=2)
    with capture_logs() as logs:
        assert await collect(store, api, clock) == 1
    assert "results_archived" in [e["event"] for e in logs]
    assert answers(db_path)["a"] == ("pending", None)


async def test_a_batch_that_cannot_be_written_does_not_hold_up_the_next(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await ended_batch(store, db_path, api, "1", "a")
    await ended_batch(store, db_path, api, "2", "b")
    api.bodies["1"], api.bodies["2"] = line("a"), line("b")
    stage = SqliteWriteBackLane.stage_results

    async def broken_for_the_first(
        lane: SqliteWriteBackLane, local_id: int, outcomes: Any
    ) -> StageReport:
        if local_id == first:
            raise RuntimeError("a bug met only by this batch")
        return await stage(lane, local_id, outcomes)

    monkeypatch.setattr(SqliteWriteBackLane, "stage_results", broken_for_the_first)
    with capture_logs() as logs:
        assert await collect(store, api, clock) == 1
    assert answers(db_path) == {"a": ("submitted", None), "b": ("succeeded", "answer for b")}
    [failed] = [e for e in logs if e["event"] == "results_write_failed"]
    assert (failed["batch_id"], failed["log_level"]) == ("1", "error")

    monkeypatch.setattr(
        SqliteWriteBackLane, "stage_results", stage
    )  # fixed: the next cycle writes it
    assert await collect(store, api, clock) == 1
    assert answers(db_path)["a"] == ("succeeded", "answer for a")


# -- write-back lanes: the next batch is staged while the one before is applied --------


async def test_the_next_batch_is_staged_while_the_one_before_is_applied(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = {"1": ("a", "b"), "2": ("c", "d"), "3": ("e", "f")}
    locals_ = {name: await ended_batch(store, db_path, api, name, *ids[name]) for name in ids}
    for name, cids in ids.items():
        api.bodies[name] = b"\n".join(line(cid) for cid in cids)
    staged: dict[int, asyncio.Event] = {local: asyncio.Event() for local in locals_.values()}
    events: list[tuple[str, str]] = []
    stage, apply = SqliteWriteBackLane.stage_results, SqliteWriteBackLane.apply_staged
    name_of = {local: name for name, local in locals_.items()}

    async def stage_noting(lane: SqliteWriteBackLane, local_id: int, outcomes: Any) -> Any:
        events.append(("stage", name_of[local_id]))
        report = await stage(lane, local_id, outcomes)
        staged[local_id].set()
        return report

    async def apply_after_the_next_is_staged(
        lane: SqliteWriteBackLane, local_id: int, *args: Any
    ) -> AppliedRange | None:
        following = {"1": "2", "2": "3"}.get(name_of[local_id])
        if following is not None:
            # One batch after another would wait here for ever: the timeout fails the test.
            await asyncio.wait_for(staged[locals_[following]].wait(), 5)
        events.append(("apply", name_of[local_id]))
        return await apply(lane, local_id, *args)

    monkeypatch.setattr(SqliteWriteBackLane, "stage_results", stage_noting)
    monkeypatch.setattr(SqliteWriteBackLane, "apply_staged", apply_after_the_next_is_staged)
    assert await collect(store, api, clock) == 3

    assert events.index(("stage", "2")) < events.index(("apply", "1"))
    assert events.index(("stage", "3")) < events.index(("apply", "2"))
    assert answers(db_path) == {cid: ("succeeded", f"answer for {cid}") for cid in "abcdef"}
    assert query(db_path, "SELECT DISTINCT state FROM batches") == [("completed",)]


async def test_lanes_stage_apart_and_staging_never_waits_for_the_writer(
    store: Store, db_path: Path, api: ApiStub
) -> None:
    first = await ended_batch(store, db_path, api, "1", "a", "b")
    second = await ended_batch(store, db_path, api, "2", "c", "d")
    async with store.write_back_lane() as one, store.write_back_lane() as other:
        async with store.database.write_lock:  # a long write of the submitter or the poller
            await asyncio.wait_for(one.stage_results(first, [outcome("b"), outcome("a")]), 5)
            await asyncio.wait_for(other.stage_results(second, [outcome("c")]), 5)
            # ...and a user's INSERT meanwhile does not wait for the lanes at all.
            with sqlite3.connect(db_path, timeout=0) as conn:
                conn.execute("INSERT INTO tasks (custom_id, params) VALUES ('user-1', '{}')")
            conn.close()
        # Each lane applies only its own staged lines.
        applied = await other.apply_staged(second, 3, 10)
        assert applied is not None
        assert (applied.report.written, applied.report.ignored) == (1, 0)
        assert await other.apply_staged(second, 3, 10, applied.last_task_id) is None
        applied = await one.apply_staged(first, 3, 10)
        assert applied is not None
        assert applied.report.written == 2
    got = answers(db_path)
    assert [got[cid][0] for cid in "abcd"] == ["succeeded", "succeeded", "succeeded", "submitted"]


async def test_a_third_lane_waits_for_a_free_one(store: Store) -> None:
    async with store.write_back_lane(), store.write_back_lane():
        third = asyncio.create_task(store.write_back_lane().__aenter__())
        await asyncio.sleep(0.05)
        assert not third.done()
    lane = await asyncio.wait_for(third, 5)
    assert isinstance(lane, SqliteWriteBackLane)


async def test_the_key_refused_stops_the_batches_after_and_is_raised(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, cid in (("1", "a"), ("2", "b"), ("3", "c")):
        await ended_batch(store, db_path, api, name, cid)
        api.bodies[name] = line(cid)
    stage = SqliteWriteBackLane.stage_results
    tried: list[int] = []

    async def refused(lane: SqliteWriteBackLane, local_id: int, outcomes: Any) -> Any:
        tried.append(local_id)
        if len(tried) == 1:
            raise AuthenticationError(
                method="GET",
                path="/results",
                status=401,
                error_type="authentication_error",
                message="invalid x-api-key",
                request_id=None,
            )
        return await stage(lane, local_id, outcomes)

    monkeypatch.setattr(SqliteWriteBackLane, "stage_results", refused)
    with capture_logs(), pytest.raises(AuthenticationError):
        await collect(store, api, clock)
    assert len(tried) == 1  # no batch was started after the key was refused
    assert {status for status, _ in answers(db_path).values()} == {"submitted"}


async def test_cancelled_while_two_batches_are_in_flight_leaves_no_task_running(
    store: Store, db_path: Path, api: ApiStub, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, cid in (("1", "a"), ("2", "b")):
        await ended_batch(store, db_path, api, name, cid)
        api.bodies[name] = line(cid)
    applying = asyncio.Event()

    async def apply_for_ever(lane: SqliteWriteBackLane, *args: Any) -> AppliedRange | None:
        applying.set()
        await asyncio.Event().wait()
        return None

    monkeypatch.setattr(SqliteWriteBackLane, "apply_staged", apply_for_ever)
    before = asyncio.all_tasks()
    running = asyncio.create_task(collect(store, api, clock))
    await asyncio.wait_for(applying.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not running]
    # A store write already begun finishes on its own (shielded); nothing else is left.
    writes = [t for t in left if t.get_name() == "batchd-store-write"]
    assert [t.get_coro().__qualname__ for t in left if t not in writes] == []  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*writes), 5)


async def test_lanes_that_fail_to_open_are_closed_at_once_and_opened_later(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attach = batchd.store.sqlite.staging.attach_staging
    opened: list[int] = []

    async def second_lane_refused(db: Any) -> None:
        opened.append(1)
        if len(opened) % 2 == 0:  # the second lane of each attempt
            raise sqlite3.OperationalError("unable to open database file")
        await attach(db)

    monkeypatch.setattr(batchd.store.sqlite.staging, "attach_staging", second_lane_refused)
    threads = threading.active_count()  # one per aiosqlite connection
    for _ in range(3):
        with pytest.raises(StoreError, match="unable to open"):
            async with store.write_back_lane():
                pass
        assert threading.active_count() == threads  # nothing left open until close
    monkeypatch.setattr(batchd.store.sqlite.staging, "attach_staging", attach)
    local_id = await ended_batch(store, db_path, ApiStub(), "1", "a")
    async with store.write_back_lane() as lane:
        assert (await lane.stage_results(local_id, [outcome("a")])).staged == 1
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        async with store.write_back_lane():
            pass
