"""A whole-batch 400 that names no request: the batch is halved until the culprit is alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import pytest

from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import run_daemon
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.fakeapi import refuse_in_fake
from tests.support.params import request_params


def refuse_batches_holding(monkeypatch: pytest.MonkeyPatch, refused: set[str]) -> None:
    """The fake refuses any batch that holds one of these ids, naming no index."""
    refuse_in_fake(monkeypatch, refused, lambda _: "requests: a request in this batch is refused")


pytestmark = pytest.mark.both_stores


# Makes the fake refuse every batch holding one of `refused`, enqueues `tasks`, and gives
# the config of a daemon sending batches of at most `max_requests`.
Prepare = Callable[[set[str], Iterable[tuple[str, str]], int], Awaitable[Config]]


@pytest.fixture
def prepare(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> Prepare:
    async def prepared(
        refused: set[str], tasks: Iterable[tuple[str, str]], max_requests: int
    ) -> Config:
        refuse_batches_holding(monkeypatch, refused)
        await store.enqueue(tasks)
        return daemon_config(fake_api.base_url, max_requests=max_requests)

    return prepared


def rows(peek: Peek) -> dict[str, tuple[str, int, str | None]]:
    found = peek.query("SELECT custom_id, status, attempts, error FROM tasks")
    return {custom_id: (status, attempts, error) for custom_id, status, attempts, error in found}


async def test_bisection_isolates_the_refused_requests_and_sends_all_the_others(
    prepare: Prepare, fake_api: FakeApiServer, peek: Peek
) -> None:
    refused = {"t-13", "t-29"}
    tasks = ((f"t-{n}", request_params(f"bisect {n}")) for n in range(40))
    config = await prepare(refused, tasks, 16)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0

    found = rows(peek)
    for custom_id, (status, attempts, error) in found.items():
        if custom_id in refused:
            assert (status, attempts) == ("invalid", 0)
            assert "a request in this batch is refused" in (error or "")
        else:
            assert (status, attempts) == ("succeeded", 1), custom_id
            assert fake_api.state.stats.submissions[custom_id] == 1


async def test_a_refusal_that_is_not_about_any_request_fails_no_task(
    prepare: Prepare, fake_api: FakeApiServer, peek: Peek
) -> None:
    everything = {f"t-{n}" for n in range(8)}
    tasks = ((custom_id, request_params(custom_id)) for custom_id in sorted(everything))
    config = await prepare(everything, tasks, 8)  # e.g. an account setting: every batch
    running = asyncio.create_task(run_daemon(config, "k", exit_when_idle=True))
    await asyncio.sleep(1.5)
    found = rows(peek)
    statuses = [status for status, _, _ in found.values()]
    # A lone refused request is only a suspect; the control (another task, alone) is
    # refused too, so the problem is not in the requests: all wait for it to be fixed.
    assert statuses.count("invalid") == 0
    assert statuses.count("pending") == 8
    assert fake_api.state.stats.creates_accepted == 0
    assert not running.done()  # waiting for the refusal to stop, not spinning through tasks
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
