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
from batchd.fakeapi import validation
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiServer
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import SubmitResult, Submitter
from batchd.service.daemon import run_daemon
from batchd.store import Store
from tests.support.fakeapi import refuse_in_fake
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

    async def step(self) -> SubmitResult:
        """One submit step; then time moves on by the wait it asked for (as the daemon does)."""
        result = await self.submitter.submit_once()
        self.time.now += result.retry_after_s or 0.0
        return result


@pytest.fixture
async def rig(
    store: Store, fake_api: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[int], Rig]]:
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
            return Rig(submitter, client, time, attempts)

        yield make


def rows(db_path: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(db_path) as db:
        found = db.execute("SELECT custom_id, status, error FROM tasks").fetchall()
    return {custom_id: (status, error) for custom_id, status, error in found}


def statuses(db_path: Path) -> list[str]:
    return [status for status, _ in rows(db_path).values()]


async def test_an_account_level_400_blames_no_task_and_pauses_longer_each_time(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    daemon_config: Callable[..., Config],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [f"t-{n}" for n in range(20)]
    refused = set(ids)  # every create is refused, whatever it holds
    refuse_in_fake(monkeypatch, refused, lambda _: ACCOUNT_REFUSAL)
    await store.enqueue((custom_id, request_params(custom_id)) for custom_id in ids)
    run = rig(8)

    waits: list[float] = []
    while len(waits) < 10:  # the refusal is lifted between cycles, not within one
        if wait := (await run.step()).retry_after_s:
            waits.append(wait)
        assert "invalid" not in statuses(db_path)  # nobody blamed, ever
        assert len(run.attempts) < 40
    assert statuses(db_path).count("pending") == 20
    assert waits[:6] == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    assert all(wait == 900.0 for wait in waits[5:])
    assert fake_api.state.stats.creates_accepted == 0

    # A wake-up in the middle of a pause (a batch ended) sends nothing.
    sent = len(run.attempts)
    run.time.now -= 1.0
    held = await run.submitter.submit_once()
    assert held.waiting
    assert held.retry_after_s == pytest.approx(1.0)
    assert len(run.attempts) == sent
    run.time.now += 1.0

    refused.clear()  # the balance is topped up
    results = [await run.step() for _ in range(8)]
    assert not any(result.retry_after_s for result in results)
    # One request to probe, then full batches again.
    assert [result.requests for result in results if result.created] == [1, 8, 8, 3]
    assert statuses(db_path).count("submitted") == 20
    # Next time the account is refused, the pauses start again from the first.
    refused.update(f"t-{n}" for n in range(20, 24))
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(20, 24))
    waits = [r.retry_after_s for r in [await run.step() for _ in range(6)] if r.retry_after_s]
    assert waits[:2] == [60.0, 120.0]
    refused.clear()

    config = daemon_config(fake_api.base_url, max_requests=8)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
    assert statuses(db_path) == ["succeeded"] * 24


async def test_a_lone_refused_request_is_blamed_only_once_a_control_is_accepted(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse_in_fake(monkeypatch, {"t-5"}, lambda _: REQUEST_REFUSAL)
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(8))
    run = rig(8)

    blamed_at: SubmitResult | None = None
    for _ in range(12):
        before = rows(db_path)["t-5"][0]
        result = await run.step()
        if blamed_at is None and rows(db_path)["t-5"][0] == "invalid":
            assert before == "pending"
            blamed_at = result
    # t-5 became invalid in the step whose control (another task, alone) was accepted,
    # not in the step where it was refused alone.
    assert blamed_at == SubmitResult(created=1, requests=1)
    found = rows(db_path)
    assert found["t-5"] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(8) if n != 5)
    assert all(fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(8) if n != 5)


async def test_a_lone_refusal_with_no_other_task_to_test_it_blames_nobody_yet(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse_in_fake(monkeypatch, {"bad"}, lambda _: REQUEST_REFUSAL)
    await store.enqueue([("bad", request_params("bad"))])
    run = rig(8)

    waits = [r.retry_after_s for r in [await run.step() for _ in range(6)] if r.retry_after_s]
    assert waits == [60.0, 120.0, 240.0]  # retried alone, later each time; not blamed
    assert statuses(db_path) == ["pending"]

    await store.enqueue([("good", request_params("good"))])  # now a control exists
    for _ in range(3):
        await run.step()
    found = rows(db_path)
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


async def run_for(run: Rig, seconds: float) -> None:
    """Submit steps every simulated second (the daemon may be woken any time)."""
    end = run.time.now + seconds
    while run.time.now < end:
        await run.submitter.submit_once()
        run.time.now += 1.0


async def test_a_429_without_retry_after_backs_off_until_a_create_succeeds(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
) -> None:
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(40))
    spend_cap = creates_refused_with_429(retry_after_s=0.0)  # "0" reads as no retry-after
    fake_api.faults.config = spend_cap
    run = rig(4)

    await run_for(run, 700)
    assert spacings(run.attempts) == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0]
    assert fake_api.state.stats.creates_accepted == 0

    fake_api.faults.config = FaultConfig()
    accepted = await run.step()
    while not accepted.created:
        run.time.now += 1.0
        accepted = await run.step()
    fake_api.faults.config = spend_cap
    first = len(run.attempts)
    await run_for(run, 40)
    assert spacings(run.attempts[first:]) == [5.0, 10.0, 20.0]  # the backoff starts again


async def test_a_tiny_429_retry_after_is_raised_to_a_second(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
) -> None:
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(8))
    fake_api.faults.config = creates_refused_with_429(retry_after_s=0.01)
    run = rig(4)
    await run_for(run, 5)
    assert spacings(run.attempts) == [1.0, 1.0, 1.0, 1.0]


async def test_a_429_retry_after_is_honoured_even_when_woken_early(
    store: Store, fake_api: FakeApiServer, rig: Callable[[int], Rig]
) -> None:
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(4))
    fake_api.faults.config = creates_refused_with_429(retry_after_s=30.0)
    run = rig(4)
    await run_for(run, 100)
    assert spacings(run.attempts) == [30.0, 30.0, 30.0]


def refuse_times(monkeypatch: pytest.MonkeyPatch, refusals_left: dict[str, int]) -> None:
    """Like `refuse_in_fake`, but each custom_id is refused only that many more times."""
    check_envelope = validation._check_envelope

    def stricter(index: int, item: object) -> tuple[str, dict[str, object]]:
        custom_id, params = check_envelope(index, item)
        if refusals_left.get(custom_id, 0) > 0:
            refusals_left[custom_id] -= 1
            raise validation.CreateRejected(REQUEST_REFUSAL)
        return custom_id, params

    monkeypatch.setattr(validation, "_check_envelope", stricter)


async def steps(run: Rig, count: int) -> list[SubmitResult]:
    return [await run.step() for _ in range(count)]


async def test_two_refused_requests_at_the_head_are_both_blamed_without_a_pause(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second is the first one's control: its refusal is not the account's.
    refuse_in_fake(monkeypatch, {"t-0", "t-1"}, lambda _: REQUEST_REFUSAL)
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(10))
    run = rig(8)

    results = await steps(run, 16)
    assert [r.retry_after_s for r in results if r.retry_after_s] == []  # never paused
    found = rows(db_path)
    for culprit in ("t-0", "t-1"):
        assert found[culprit] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(2, 10))
    assert all(fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(2, 10))
    # Once both are found, the tasks behind them go in one batch again, not one by one.
    assert [r.requests for r in results if r.created][-1] == 7


async def test_a_suspect_accepted_when_retried_alone_was_innocent(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # t-0 is always refused; t-1 only once (a refusal of its own that passed): both
    # become suspects, a control is accepted, and each is retried alone.
    refuse_times(monkeypatch, {"t-0": 1_000, "t-1": 1})
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(10))
    run = rig(8)

    results = await steps(run, 16)
    assert [r.retry_after_s for r in results if r.retry_after_s] == []
    found = rows(db_path)
    assert found["t-0"] == ("invalid", f"refused by the API: {REQUEST_REFUSAL}")
    assert all(found[f"t-{n}"][0] == "submitted" for n in range(1, 10))
    assert fake_api.state.stats.submissions["t-1"] == 1


async def test_more_refused_requests_at_the_head_than_suspects_are_all_found_in_the_end(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Five bad requests in a row look like an account-level refusal for a while (creates
    # pause), but the probes after the pauses move on through the queue instead of
    # trying the same requests for ever, and every bad one is found.
    bad = {f"t-{n}" for n in range(5)}
    refuse_in_fake(monkeypatch, bad, lambda _: REQUEST_REFUSAL)
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(12))
    run = rig(8)

    for _ in range(60):
        await run.step()
        if "pending" not in statuses(db_path):
            break
    found = rows(db_path)
    assert {custom_id for custom_id, (status, _) in found.items() if status == "invalid"} == bad
    assert all(found[f"t-{n}"] == ("submitted", None) for n in range(5, 12))
    assert all(fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(5, 12))
    assert len(run.attempts) < 40
    assert run.time.now - 1000.0 < 3600  # a few short pauses, not hours


async def test_batches_are_full_again_once_an_unnamed_400_clears_without_a_culprit(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse_times(monkeypatch, {"t-0": 1})  # refused once, then fine: nobody to blame
    await store.enqueue((f"t-{n}", request_params(f"t-{n}")) for n in range(40))
    run = rig(8)

    results = await steps(run, 12)
    # Halved once; both halves accepted, so the refusal is behind us: full batches again.
    assert [r.requests for r in results if r.created] == [4, 4, 8, 8, 8, 8]
    assert statuses(db_path) == ["submitted"] * 40


TOO_LARGE = "Request exceeds the maximum allowed number of bytes."


def body_bytes(*texts: str) -> int:
    """The size of a create body holding these requests (`t-0`, `t-1`, ... as custom_ids)."""
    items = [
        f'{{"custom_id":"t-{n}","params":{request_params(text)}}}' for n, text in enumerate(texts)
    ]
    return len('{"requests":[' + ",".join(items) + "]}")


async def test_a_413_never_marks_a_request_invalid_for_our_own_lowered_limit(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
) -> None:
    big, small = "b" * 3000, "s"
    await store.enqueue(
        [("t-0", request_params(big))] + [(f"t-{n}", request_params(small)) for n in range(1, 7)]
    )
    # A proxy in front of the API takes the big request alone, not with the others.
    fake_api.api.max_body_bytes = body_bytes(big) + 50
    assert body_bytes(big, *[small] * 6) > fake_api.api.max_body_bytes
    run = rig(8)

    await steps(run, 8)
    assert statuses(db_path) == ["submitted"] * 7
    assert fake_api.state.stats.submissions["t-0"] == 1


async def test_a_request_too_large_even_alone_is_invalid_with_the_apis_reason(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
) -> None:
    big, small = "b" * 3000, "s"
    await store.enqueue(
        [("t-0", request_params(big))] + [(f"t-{n}", request_params(small)) for n in range(1, 7)]
    )
    fake_api.api.max_body_bytes = 2000  # the big one never passes, the others do
    run = rig(8)

    await steps(run, 10)
    found = rows(db_path)
    status, error = found["t-0"]
    assert status == "invalid"
    # What the API said of it alone, not our own lowered limit.
    assert (error or "").startswith("refused by the API as too large")
    assert TOO_LARGE in (error or "")
    assert all(found[f"t-{n}"] == ("submitted", None) for n in range(1, 7))


async def test_413s_for_every_body_blame_nobody_and_full_batches_resume(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
) -> None:
    text = "m" * 1200  # each request alone is over 1 KB, the lowest limit halving reaches
    await store.enqueue((f"t-{n}", request_params(text)) for n in range(12))
    fake_api.api.max_body_bytes = 100  # a proxy refusing every body, whatever its size
    run = rig(8)

    waits: list[float] = []
    while len(waits) < 3:
        if wait := (await run.step()).retry_after_s:
            waits.append(wait)
        assert "invalid" not in statuses(db_path)  # nobody blamed, ever
        assert len(run.attempts) < 40
    assert fake_api.state.stats.creates_accepted == 0
    # Only the pauses wait: the halvings before them were sent at once (a 413 is about
    # size, nothing to wait out), and the third lone refusal in a row paused creates.
    assert waits == [60.0, 120.0, 240.0]

    fake_api.api.max_body_bytes = MAX_BATCH_BYTES  # the proxy is fixed
    results = await steps(run, 6)
    assert statuses(db_path) == ["submitted"] * 12
    # One request to probe, then full batches: the halvings were not about size.
    assert [r.requests for r in results if r.created] == [1, 8, 3]


async def test_a_413_on_a_batch_of_several_is_retried_at_once_with_half_the_bytes(
    store: Store,
    fake_api: FakeApiServer,
    rig: Callable[[int], Rig],
    db_path: Path,
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
    results = [refused, *await steps(run, 4)]
    assert spacings(run.attempts) == [0.0] * (len(run.attempts) - 1)  # nothing waited
    # What was sent: all eight, refused; then batches within half that body, accepted.
    assert sizes[0] > fake_api.api.max_body_bytes
    assert all(size <= sizes[0] // 2 for size in sizes[1:])
    assert sum(r.requests for r in results if r.created) == 8
    assert statuses(db_path) == ["submitted"] * 8
    assert all(fake_api.state.stats.submissions[f"t-{n}"] == 1 for n in range(8))  # once each
