"""A create whose answer never arrived: adopt what the API has, resubmit only when sure.

The submitter runs against the fake API over loopback with a real database; its clock is
ours, so "the grace period has passed" needs no sleeping.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchd.api import BatchesClient, BytesBody, RetryPolicy
from batchd.config import BatchingConfig, Config
from batchd.domain import BatchState, TaskStatus
from batchd.fakeapi import app
from batchd.fakeapi.faults import FaultConfig, FaultKind
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.fakeapi.validation import parse_create_body
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import Submitter
from batchd.service.daemon import run_daemon
from batchd.store import Store
from tests.support.params import request_params

GRACE_S = 60.0
CUSTOM_IDS = [f"r-{n}" for n in range(3)]


@dataclass
class Rig:
    store: Store
    client: BatchesClient
    submitter: Submitter
    reconciler: Reconciler
    now: list[datetime]  # the submitter's clock: now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += timedelta(seconds=seconds)


@pytest.fixture
async def rig(store: Store, fake_api: FakeApiServer) -> AsyncIterator[Rig]:
    await store.enqueue((cid, request_params(f"question {cid}")) for cid in CUSTOM_IDS)
    now = [datetime.now(UTC)]

    def monotonic() -> float:
        return now[0].timestamp()

    async with aiohttp.ClientSession() as session:
        client = BatchesClient(
            session, base_url=fake_api.base_url, api_key="k", policy=RetryPolicy(max_retries=0)
        )
        config = replace(BatchingConfig(), max_requests=10, linger_s=0.0, reconcile_grace_s=GRACE_S)
        reconciler = Reconciler(store, client, config, clock=lambda: now[0])
        submitter = Submitter(store, client, config, reconciler=reconciler, monotonic=monotonic)
        yield Rig(store, client, submitter, reconciler, now)


def on_create(kind: FaultKind) -> FaultConfig:
    return FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=(kind,), http_fault_endpoints=("create",)
    )


async def test_a_create_whose_answer_was_lost_is_adopted_from_the_list_not_resubmitted(
    rig: Rig, fake_api: FakeApiServer
) -> None:
    fake_api.faults.config = on_create("commit_drop")  # created, then the connection drops
    assert (await rig.submitter.submit_once()).created == 0
    [creating] = await rig.reconciler.creating_batches()
    fake_api.faults.config = FaultConfig()

    await rig.reconciler.reconcile(creating)

    [on_api] = fake_api.state.batches.values()
    [adopted] = await rig.store.batches_in(BatchState.IN_PROGRESS)
    assert adopted.api_batch_id == on_api.id
    assert await rig.reconciler.creating_batches() == []
    rig.advance(GRACE_S * 2)  # nothing left to resubmit, however long we wait
    assert (await rig.submitter.submit_once()).created == 0
    assert fake_api.state.stats.creates_accepted == 1
    assert set(fake_api.state.stats.submissions.values()) == {1}
    assert await rig.store.duplicate_batches() == []


async def test_a_create_that_never_reached_the_api_is_resubmitted_only_after_the_grace(
    rig: Rig, fake_api: FakeApiServer
) -> None:
    fake_api.faults.go_down(fake_api.clock(), 3600, "drop")  # no batch is created
    assert (await rig.submitter.submit_once()).created == 0
    [creating] = await rig.reconciler.creating_batches()
    fake_api.faults.down_until = None

    rig.advance(GRACE_S / 2)
    await rig.reconciler.reconcile(creating)  # the list may lag: keep waiting
    assert [b.local_id for b in await rig.reconciler.creating_batches()] == [creating.local_id]
    counts = await rig.store.status_counts()
    assert counts[TaskStatus.SUBMITTED] == len(CUSTOM_IDS)

    rig.advance(GRACE_S)
    await rig.reconciler.reconcile(creating)
    assert await rig.reconciler.creating_batches() == []
    assert (await rig.store.status_counts())[TaskStatus.PENDING] == len(CUSTOM_IDS)
    result = await rig.submitter.submit_once()
    assert result.created == 1
    assert fake_api.state.stats.creates_accepted == 1
    assert set(fake_api.state.stats.submissions.values()) == {1}
    rows = await rig.store.tasks_by_custom_id(CUSTOM_IDS)
    assert {row.attempts for row in rows} == {1}  # the create that never arrived is not counted


async def test_two_matching_batches_one_is_adopted_the_other_recorded_and_shown_by_status(
    rig: Rig, fake_api: FakeApiServer, db_path: Path, tmp_path: Path
) -> None:
    fake_api.faults.config = on_create("commit_drop")
    await rig.submitter.submit_once()
    fake_api.faults.config = FaultConfig()
    [creating] = await rig.reconciler.creating_batches()
    # A second copy of the same requests on the API, e.g. from a create retried by hand.
    body = orjson.dumps(
        {
            "requests": [
                {"custom_id": cid, "params": orjson.loads(request_params(f"question {cid}"))}
                for cid in CUSTOM_IDS
            ]
        }
    )
    second = await rig.client.create(BytesBody(body))

    await rig.reconciler.reconcile(creating)

    first_id = next(b.id for b in fake_api.state.batches.values() if b.id != second["id"])
    adopted, candidate = await rig.store.batches_in(BatchState.IN_PROGRESS)
    assert adopted.api_batch_id == first_id  # the oldest
    assert (candidate.api_batch_id, candidate.candidate_for) == (second["id"], creating.local_id)
    [(duplicate_id, _, note)] = await rig.store.duplicate_batches()
    assert duplicate_id == second["id"]
    assert f"local batch {creating.local_id}" in note

    config = tmp_path / "status.toml"
    config.write_text(f'[database]\npath = "{db_path}"\n')
    status = subprocess.run(
        [sys.executable, "-m", "batchd", "--config", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "BATCHD_CONFIG": str(config)},
    )
    assert status.returncode == 0, status.stderr
    assert f"POSSIBLE DUPLICATE BATCH {second['id']}" in status.stdout


async def test_a_create_slower_than_the_grace_is_adopted_when_it_lands_not_sent_twice(
    store: Store,
    daemon_config: Callable[..., Config],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server takes longer over the create than our timeout allows and creates the
    # batch after we gave up. The call lasted longer than the grace period (as a 256 MB
    # upload can: the create timeout allows for the upload, the grace does not), so the
    # grace must count from when we gave up on the call, not from the intent, or the list
    # is read, and the requests sent again, before the batch exists there.
    await store.enqueue((cid, request_params(f"question {cid}")) for cid in CUSTOM_IDS)
    await store.close()

    async def slow_create(request: web.Request) -> web.StreamResponse:
        api = request.app[app.FAKE_API]
        body = await request.read()  # all received; the server is still working on it
        await asyncio.sleep(1.5)  # past our 1 s timeout: the create lands after we gave up
        batch = api.state.create(parse_create_body(body), api.faults.config)
        return app.json_response(request, batch.view(api.clock(), api.state.timeline, ""))

    monkeypatch.setattr(app, "create_batch", slow_create)
    async with FakeApiServer(FakeApiConfig(processing_seconds=0.2)) as fake:
        config = daemon_config(fake.base_url, reconcile_grace_s=1.0)
        config = replace(config, api=replace(config.api, request_timeout_s=1.0))
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
        assert fake.state.stats.creates_attempted == 1  # never sent twice
        assert set(fake.state.stats.submissions.values()) == {1}
    with sqlite3.connect(db_path) as db:
        states = db.execute("SELECT state FROM batches").fetchall()
    assert states == [("completed",)]
