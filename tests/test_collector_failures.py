"""A download that fails: its staged lines are given back at once, and a fatal error in
one batch stops the batch downloading beside it. Against a results server on loopback
and real SQLite files (a full disk is SQLite's page cap, as SQLite fills a disk)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

import batchd.pipeline.collector
from batchd.domain import Outcome
from batchd.store import StageReport, Store, StoreError
from batchd.store.sqlite import SqliteStore, SqliteWriteBackLane
from tests.support.collector import ApiStub, answers, collect, ended_batch, line, serving
from tests.support.store import FakeClock, query

pytestmark = pytest.mark.fake_clock

BIG = "x" * 100_000  # an answer of 100 KB: staged lines take room, applied ones new pages
NO_CAP = 1073741823  # SQLite's default max_page_count


@dataclass
class SlowApi(ApiStub):
    """Results bodies as set; those named in `slow` sent in ten pieces 0.2 s apart (a
    large download still under way)."""

    slow: set[str] = field(default_factory=set)


@pytest.fixture
async def api() -> AsyncIterator[SlowApi]:
    stub = SlowApi()

    async def results(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = stub.bodies[name]
        if name not in stub.slow:
            return web.Response(body=body)
        response = web.StreamResponse()
        await response.prepare(request)
        piece = max(1, len(body) // 10)
        for start in range(0, len(body), piece):
            await response.write(body[start : start + piece])
            await asyncio.sleep(0.2)
        await response.write_eof()
        return response

    async with serving(stub, results):
        yield stub


def body(*custom_ids: str, text: str | None = None) -> bytes:
    return b"\n".join(line(cid, text) for cid in custom_ids) + b"\n"


async def assert_nothing_staged(store: Store, local_id: int) -> None:
    """Neither lane holds a line of `local_id`, nor the room its lines took."""
    assert isinstance(store, SqliteStore)
    async with store.write_back_lane() as one, store.write_back_lane() as other:
        for lane in (one, other):
            assert isinstance(lane, SqliteWriteBackLane)
            db = lane.connection.db
            [(rows,)] = await db.execute_fetchall("SELECT count(*) FROM staging.results")
            [(pages,)] = await db.execute_fetchall("PRAGMA staging.page_count")
            [(page_size,)] = await db.execute_fetchall("PRAGMA staging.page_size")
            assert (rows, pages * page_size < 64 * 1024) == (0, True)
            # Nothing a later apply on this lane could find either.
            assert await lane.apply_staged(local_id, 3, 100) is None


def count_staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lines each stage call kept, as they happen (the real staging underneath)."""
    kept: list[int] = []
    stage = SqliteWriteBackLane.stage_results

    async def counted(lane: SqliteWriteBackLane, local_id: int, outcomes: Any) -> StageReport:
        report = await stage(lane, local_id, outcomes)
        kept.append(report.staged)
        return report

    monkeypatch.setattr(SqliteWriteBackLane, "stage_results", counted)
    return kept


async def test_a_download_that_fails_on_a_bug_gives_back_what_it_staged(
    store: Store, db_path: Path, api: SlowApi, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"t-{n}" for n in range(6)]
    local_id = await ended_batch(store, db_path, api, "1", *ids)
    api.bodies["1"] = body(*ids, text=BIG)
    parse = batchd.pipeline.collector.parse_result_line

    def a_bug_at_the_fifth_line(raw: bytes) -> Outcome:
        if b'"t-4"' in raw:
            raise RuntimeError("a bug only this batch meets")
        return parse(raw)

    monkeypatch.setattr(batchd.pipeline.collector, "parse_result_line", a_bug_at_the_fifth_line)
    staged = count_staged(monkeypatch)
    with capture_logs() as logs:
        assert await collect(store, api, clock, chunk_size=2) == 0
    assert staged == [2, 2]  # 400 KB staged before the failure
    assert "results_write_failed" in [e["event"] for e in logs]

    await assert_nothing_staged(store, local_id)  # not kept until this lane's next download
    assert {status for status, _ in answers(db_path).values()} == {"submitted"}
    assert query(db_path, "SELECT state FROM batches") == [("ended",)]  # tried again later


async def test_a_download_that_fails_for_a_full_disk_gives_back_what_it_staged(
    store: Store, db_path: Path, api: SlowApi, clock: FakeClock
) -> None:
    assert isinstance(store, SqliteStore)
    ids = [f"t-{n}" for n in range(6)]
    local_id = await ended_batch(store, db_path, api, "1", *ids)
    api.bodies["1"] = body(*ids, text=BIG)
    async with store.write_back_lane() as one, store.write_back_lane() as other:
        lanes = [one, other]
        for lane in lanes:  # the database's disk is full: applying needs new pages
            db = lane.connection.db
            [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
            await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")

    with pytest.raises(StoreError, match="disk is full"):
        await collect(store, api, clock, chunk_size=2)
    await assert_nothing_staged(store, local_id)  # 600 KB of staging freed, not kept

    for lane in lanes:  # space freed: nothing was lost
        await lane.connection.db.execute_fetchall(f"PRAGMA max_page_count = {NO_CAP}")
    assert await collect(store, api, clock, chunk_size=2) == 1
    assert {status for status, _ in answers(db_path).values()} == {"succeeded"}


async def test_a_full_disk_in_one_batch_stops_the_next_before_it_is_read_and_applied(
    store: Store, db_path: Path, api: SlowApi, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await ended_batch(store, db_path, api, "1", "a", "b")
    second = await ended_batch(store, db_path, api, "2", "c", "d")
    api.bodies["1"] = body("a", "b", text=BIG)
    api.bodies["2"] = body("c", "d")
    api.slow.add("2")  # still downloading (2 s) while the first one is applied
    apply = SqliteWriteBackLane.apply_staged
    capped: list[Any] = []

    async def the_disk_fills_under_the_first(
        lane: SqliteWriteBackLane, local_id: int, *args: Any
    ) -> Any:
        if local_id == first and not capped:  # the first batch's lane: no page to spare
            db = lane.connection.db
            [(pages,)] = await db.execute_fetchall("PRAGMA page_count")
            await db.execute_fetchall(f"PRAGMA max_page_count = {pages}")
            capped.append(db)
        return await apply(lane, local_id, *args)

    monkeypatch.setattr(SqliteWriteBackLane, "apply_staged", the_disk_fills_under_the_first)
    with pytest.raises(StoreError, match="disk is full"):
        await collect(store, api, clock)
    assert capped
    # Raised at once: the second batch was stopped mid-download, not read to its end and
    # applied first (it used to be, on the other lane, before the error came out).
    assert {cid: status for cid, (status, _) in answers(db_path).items()} == dict.fromkeys(
        "abcd", "submitted"
    )
    assert query(db_path, "SELECT DISTINCT state FROM batches") == [("ended",)]
    await assert_nothing_staged(store, first)
    await assert_nothing_staged(store, second)

    # Nothing is lost either way: both batches are still `ended`, and once there is room
    # again the next pass downloads both and writes every result, once.
    await capped[0].execute_fetchall(f"PRAGMA max_page_count = {NO_CAP}")
    assert await collect(store, api, clock) == 2
    assert {status for status, _ in answers(db_path).values()} == {"succeeded"}
    assert query(db_path, "SELECT DISTINCT state FROM batches") == [("completed",)]
