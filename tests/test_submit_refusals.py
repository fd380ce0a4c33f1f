"""Create refusals that are not about a request: no innocent task is blamed, creates back off.

The submitter runs against the fake API on loopback with a fake monotonic clock, so the
waits it asks for (minutes) are read and skipped instead of slept.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest

from batchd.api import BatchesClient, RequestBody, RetryPolicy
from batchd.api.wire import MAX_BATCH_BYTES, MessageBatch
from batchd.config import BatchingConfig, Config
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiServer
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import SubmitResult, Submitter
from batchd.service.daemon import run_daemon
from batchd.store import Store
from tests.support.fakeapi import refuse_in_fake, refuse_in_fake_by
from tests.support.params import request_params

ACCOUNT_REFUSAL = "Your credit balance is too low to access the Anthropic API."
REQUEST_REFUSAL = "requests: a request in this batch is refused"


@dataclass
class FakeTime:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    submitter: Submitter
    client: BatchesClient
    time: FakeTime
    attempts: list[float]  # fake time of every create sent
    store: Store
    fake_api: FakeApiServer
    db_path: Path
    monkeypatch: pytest.MonkeyPatch

    async def step(self) -> SubmitResult:
        """One submit step; then time moves on by the wait it asked for (as the daemon does)."""
        result = await self.submitter.submit_once()
        self.time.now += result.retry_after_s or 0.0
        return result

    async def steps(self, count: int) -> list[SubmitResult]:
        return [await self.step() for _ in range(count)]

    async def run_for(self, seconds: float) -> None:
        """Submit steps every simulated second (the daemon may be woken any time)."""
        end = self.time.now + seconds
        while self.time.now < end:
            await self.submitter.submit_once()
            self.time.now += 1.0

    async def enqueue(self, stop: int, start: int = 0) -> None:
        """Tasks t-START to t-(STOP-1), each with a prompt of its own custom_id."""
        await self.store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(start, stop))

    def refuse(self, refused: set[str], message: str) -> None:
        """The fake refuses any create holding one of `refused` (the set may change later)."""
        refuse_in_fake(self.monkeypatch, refused, lambda _: message)

    def rows(self) -> dict[str, tuple[str, str | None]]:
        with sqlite3.connect(self.db_path) as db:
            found = db.execute("SELECT custom_id, status, error FROM tasks").fetchall()
        return {custom_id: (status, error) for custom_id, status, error in found}

    def statuses(self) -> list[str]:
        return [status for status, _ in self.rows().values()]


MakeRig = Callable[[int], Rig]  # a rig whose batches hold at most that many requests


@pytest.fixture
async def rig(
    store: Store, fake_api: FakeApiServer, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeRig]:
    async with aiohttp.ClientSession() as session:
        client = BatchesClient(
            session, base_url=fake_api.base_url, api_key="k", policy=RetryPolicy(max_retries=0)
        )

        def make(max_requests: int) -> Rig:
            time = FakeTime()
            attempts: list[float] = []
            create = client.create

            async def recorded_create(body: RequestBody) -> MessageBatch:
                attempts.append(time.now)
                return await create(body)

            monkeypatch.setattr(client, "create", recorded_create)
            config = replace(BatchingConfig(), max_requests=max_requests, linger_s=0.0)
            reconciler = Reconciler(store, client, config, clock=lambda: datetime.now(UTC))
            submitter = Submitter(store, client, config, reconciler=reconciler, monotonic=time)
            return Rig(submitter, client, time, attempts, store, fake_api, db_path, monkeypatch)

        yield make


async def test_an_account_level_400_blames_no_task_and_pauses_longer_each_time(
    rig: MakeRig, daemon_config: Callable[..., Config]
) -> None:
    run = rig(8)
    refused = {f"t-{n}" for n in range(20)}  # every create is refused, whatever it holds
    run.refuse(refused, ACCOUNT_REFUSAL)
    await run.enqueue(20)

    waits: list[float] = []
    while len(waits) < 10:  # the refusal is lifted between cycles, not within one
        if wait := (await run.step()).retry_after_s:
            waits.append(wait)
        assert "invalid" not in run.statuses()  # nobody blamed, ever
        assert len(run.attempts) < 40
    assert run.statuses().count("pending") == 20
    assert waits[:6] == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    assert all(wait == 900.0 for wait in waits[5:])
    assert run.fake_api.state.stats.creates_accepted == 0

    # A wake-up in the middle of a pause (a batch ended) sends nothing.
    sent = len(run.attempts)
    run.time.now -= 1.0
    held = await run.submitter.submit_once()
    assert held.waiting
    assert held.retry_after_s == pytest.approx(1.0)
    assert len(run.attempts) == sent
    run.time.now += 1.0

    refused.clear()  # the balance is topped up
    results = await run.steps(8)
    assert not any(result.retry_after_s for result in results)
    # One request to probe, then full batches again.
    assert [result.requests for result in results if result.created] == [1, 8, 8, 3]
    assert run.statuses().count("submitted") == 20
    # Next time the account is refused, the pauses start again from the first.
    refused.update(f"t-{n}" for n in range(20, 24))
    await run.enqueue(24, start=20)
    waits = [r.retry_after_s for r in await run.steps(6) if r.retry_after_s]
    assert waits[:2] == [60.0, 120.0]
    refused.clear()

    config = daemon_config(run.fake_api.base_url, max_requests=8)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
    assert run.statuses() == ["succeeded"] * 24


async def test_a_lone_refused_request_is_blamed_only_once_a_control_is_accepted(
    rig: MakeRig,
) -> None:
    run = rig(8)
    run.refuse({"t-5"}, REQUEST_REFUSAL)
    await run.enqueue(8)

    blamed_at: SubmitResult | None = None
    for _ in range(12):
        before = run.rows()["t-5"][0]
        result = await run.step()
        if blamed_at is None and run.rows()["t-5"][0] == "invalid":
            assert before == "pending"
            blamed_at = result
    # t-5 became invalid in the step whose control (another task, alone) was accepted,
    # not in the step where it was refused alone.
    assert blamed_at == SubmitResult(created=1, requests=1)
    found = run.rows()
    assert found["t-5"] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(8) if n != 5)
    assert all(run.fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(8) if n != 5)


async def test_a_lone_refusal_with_no_other_task_to_test_it_blames_nobody_yet(
    rig: MakeRig,
) -> None:
    run = rig(8)
    run.refuse({"bad"}, REQUEST_REFUSAL)
    await run.store.enqueue([("bad", request_params("bad"))])

    waits = [r.retry_after_s for r in await run.steps(6) if r.retry_after_s]
    assert waits == [60.0, 120.0, 240.0]  # retried alone, later each time; not blamed
    assert run.statuses() == ["pending"]

    await run.store.enqueue([("good", request_params("good"))])  # now a control exists
    await run.steps(3)
    found = run.rows()
    assert found["bad"] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert found["good"][0] == "submitted"


def spacings(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in pairwise(times)]


def creates_refused_with_429(*, retry_after_s: float) -> FaultConfig:
    return FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=("429",),
        http_fault_endpoints=("create",),
        retry_after_seconds=retry_after_s,
    )


async def test_a_429_without_retry_after_backs_off_until_a_create_succeeds(
    rig: MakeRig,
) -> None:
    run = rig(4)
    await run.enqueue(40)
    spend_cap = creates_refused_with_429(retry_after_s=0.0)  # "0" reads as no retry-after
    run.fake_api.faults.config = spend_cap

    await run.run_for(700)
    assert spacings(run.attempts) == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0]
    assert run.fake_api.state.stats.creates_accepted == 0

    run.fake_api.faults.config = FaultConfig()
    accepted = await run.step()
    while not accepted.created:
        run.time.now += 1.0
        accepted = await run.step()
    run.fake_api.faults.config = spend_cap
    first = len(run.attempts)
    await run.run_for(40)
    assert spacings(run.attempts[first:]) == [5.0, 10.0, 20.0]  # the backoff starts again


@pytest.mark.parametrize(
    ("retry_after_s", "tasks", "seconds", "spacing_s"),
    [
        pytest.param(0.01, 8, 5, [1.0, 1.0, 1.0, 1.0], id="a tiny one is raised to a second"),
        pytest.param(30.0, 4, 100, [30.0, 30.0, 30.0], id="honoured even when woken early"),
    ],
)
async def test_a_429_retry_after_spaces_the_creates(
    rig: MakeRig, retry_after_s: float, tasks: int, seconds: float, spacing_s: list[float]
) -> None:
    run = rig(4)
    await run.enqueue(tasks)
    run.fake_api.faults.config = creates_refused_with_429(retry_after_s=retry_after_s)
    await run.run_for(seconds)
    assert spacings(run.attempts) == spacing_s


def refuse_times(run: Rig, refusals_left: dict[str, int]) -> None:
    """Like `Rig.refuse`, but each custom_id is refused only that many more times."""

    def refusal(_: int, custom_id: str) -> str | None:
        if refusals_left.get(custom_id, 0) > 0:
            refusals_left[custom_id] -= 1
            return REQUEST_REFUSAL
        return None

    refuse_in_fake_by(run.monkeypatch, refusal)


async def test_two_refused_requests_at_the_head_are_both_blamed_without_a_pause(
    rig: MakeRig,
) -> None:
    run = rig(8)
    # The second is the first one's control: its refusal is not the account's.
    run.refuse({"t-0", "t-1"}, REQUEST_REFUSAL)
    await run.enqueue(10)

    results = await run.steps(16)
    assert [r.retry_after_s for r in results if r.retry_after_s] == []  # never paused
    found = run.rows()
    for culprit in ("t-0", "t-1"):
        assert found[culprit] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(2, 10))
    assert all(run.fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(2, 10))
    # Once both are found, the tasks behind them go in one batch again, not one by one.
    assert [r.requests for r in results if r.created][-1] == 7


async def test_a_suspect_accepted_when_retried_alone_was_innocent(rig: MakeRig) -> None:
    run = rig(8)
    # t-0 is always refused; t-1 only once (a refusal of its own that passed): both
    # become suspects, a control is accepted, and each is retried alone.
    refuse_times(run, {"t-0": 1_000, "t-1": 1})
    await run.enqueue(10)

    results = await run.steps(16)
    assert [r.retry_after_s for r in results if r.retry_after_s] == []
    found = run.rows()
    assert found["t-0"] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(1, 10))
    assert run.fake_api.state.stats.submissions["t-1"] == 1


async def test_more_refused_requests_at_the_head_than_suspects_are_all_found_in_the_end(
    rig: MakeRig,
) -> None:
    run = rig(8)
    # Five bad requests in a row look like an account-level refusal for a while (creates
    # pause), but the probes after the pauses move on through the queue instead of
    # trying the same requests for ever, and every bad one is found.
    bad = {f"t-{n}" for n in range(5)}
    run.refuse(bad, REQUEST_REFUSAL)
    await run.enqueue(12)

    for _ in range(60):
        await run.step()
        if "pending" not in run.statuses():
            break
    found = run.rows()
    assert {custom_id for custom_id, (status, _) in found.items() if status == "invalid"} == bad
    assert all(found[f"t-{n}"] == ("submitted", None) for n in range(5, 12))
    assert all(run.fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(5, 12))
    assert len(run.attempts) < 40
    assert run.time.now - 1000.0 < 3600  # a few short pauses, not hours


async def test_batches_are_full_again_once_an_unnamed_400_clears_without_a_culprit(
    rig: MakeRig,
) -> None:
    run = rig(8)
    refuse_times(run, {"t-0": 1})  # refused once, then fine: nobody to blame
    await run.enqueue(40)

    results = await run.steps(12)
    # Halved once; both halves accepted, so the refusal is behind us: full batches again.
    assert [r.requests for r in results if r.created] == [4, 4, 8, 8, 8, 8]
    assert run.statuses() == ["submitted"] * 40


TOO_LARGE = "Request exceeds the maximum allowed number of bytes."
BIG, SMALL = "b" * 3000, "s"


def body_bytes(*texts: str) -> int:
    """The size of a create body holding these requests (`t-0`, `t-1`, ... as custom_ids)."""
    items = [
        f'{{"custom_id":"t-{n}","params":{request_params(text)}}}' for n, text in enumerate(texts)
    ]
    return len('{"requests":[' + ",".join(items) + "]}")


async def enqueue_one_big_then_six_small(run: Rig) -> None:
    """t-0 with a prompt of BIG, then t-1 to t-6 with one of SMALL."""
    await run.store.enqueue(
        [("t-0", request_params(BIG))] + [(f"t-{n}", request_params(SMALL)) for n in range(1, 7)]
    )


async def test_a_413_never_marks_a_request_invalid_for_our_own_lowered_limit(
    rig: MakeRig,
) -> None:
    run = rig(8)
    await enqueue_one_big_then_six_small(run)
    # A proxy in front of the API takes the big request alone, not with the others.
    run.fake_api.api.max_body_bytes = body_bytes(BIG) + 50
    assert body_bytes(BIG, *[SMALL] * 6) > run.fake_api.api.max_body_bytes

    await run.steps(8)
    assert run.statuses() == ["submitted"] * 7
    assert run.fake_api.state.stats.submissions["t-0"] == 1


async def test_a_request_too_large_even_alone_is_invalid_with_the_apis_reason(
    rig: MakeRig,
) -> None:
    run = rig(8)
    await enqueue_one_big_then_six_small(run)
    run.fake_api.api.max_body_bytes = 2000  # the big one never passes, the others do

    await run.steps(10)
    found = run.rows()
    status, error = found["t-0"]
    assert status == "invalid"
    # What the API said of it alone, not our own lowered limit.
    assert (error or "").startswith("refused by the API as too large")
    assert TOO_LARGE in (error or "")
    assert all(found[f"t-{n}"] == ("submitted", None) for n in range(1, 7))


async def test_413s_for_every_body_blame_nobody_and_full_batches_resume(rig: MakeRig) -> None:
    run = rig(8)
    text = "m" * 1200  # each request alone is over 1 KB, the lowest limit halving reaches
    await run.store.enqueue((f"t-{n}", request_params(text)) for n in range(12))
    run.fake_api.api.max_body_bytes = 100  # a proxy refusing every body, whatever its size

    waits: list[float] = []
    while len(waits) < 3:
        if wait := (await run.step()).retry_after_s:
            waits.append(wait)
        assert "invalid" not in run.statuses()  # nobody blamed, ever
        assert len(run.attempts) < 40
    assert run.fake_api.state.stats.creates_accepted == 0
    # Only the pauses wait: the halvings before them were sent at once (a 413 is about
    # size, nothing to wait out), and the third lone refusal in a row paused creates.
    assert waits == [60.0, 120.0, 240.0]

    run.fake_api.api.max_body_bytes = MAX_BATCH_BYTES  # the proxy is fixed
    results = await run.steps(6)
    assert run.statuses() == ["submitted"] * 12
    # One request to probe, then full batches: the halvings were not about size.
    assert [r.requests for r in results if r.created] == [1, 8, 3]


async def test_a_413_on_a_batch_of_several_is_retried_at_once_with_half_the_bytes(
    store: Store,
    fake_api: FakeApiServer,
    rig: MakeRig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = "m" * 1200
    await store.enqueue((f"t-{n}", request_params(text)) for n in range(8))
    # A proxy in front of the API takes four of these requests at a time, not eight.
    fake_api.api.max_body_bytes = body_bytes(*[text] * 4) + 100
    run = rig(8)
    sizes: list[int] = []
    create = run.client.create

    async def sized(body: RequestBody) -> MessageBatch:
        sizes.append(body.size)
        return await create(body)

    monkeypatch.setattr(run.client, "create", sized)

    refused = await run.step()
    assert not refused.created
    assert not refused.retry_after_s  # was 60 s, as if the API had asked for a pause
    results = [refused, *await run.steps(4)]
    assert spacings(run.attempts) == [0.0] * (len(run.attempts) - 1)  # nothing waited
    # What was sent: all eight, refused; then batches within half that body, accepted.
    assert sizes[0] > fake_api.api.max_body_bytes
    assert all(size <= sizes[0] // 2 for size in sizes[1:])
    assert sum(r.requests for r in results if r.created) == 8
    assert run.statuses() == ["submitted"] * 8
    assert all(fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(8))  # once each
