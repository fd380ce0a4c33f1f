"""Review 7 finding 7, the refusal state machine's part: a create whose connection never
opened proves nothing about its requests; creates wait 1 s, doubling to 60 s, until the
API answers again; a probe that was due after a pause is still due."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchd.api import BadRequestError, RateLimitError
from batchd.config import BatchingConfig
from batchd.pipeline.chunker import Chunk
from batchd.pipeline.refusals import Pick, Refusals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_made: list[Chunk] = []


@pytest.fixture(autouse=True)
def _close_bodies() -> Iterator[None]:
    yield
    while _made:
        _made.pop().body.close()


def one(*task_ids: int) -> Chunk:
    made = Chunk(list(task_ids), [f"t-{n}" for n in task_ids], [f"v{n}" for n in task_ids])
    _made.append(made)
    return made


def not_sent(refusals: Refusals) -> float:
    refusals.create_sent()
    return refusals.create_not_sent()


def test_creates_not_sent_hold_creates_longer_each_time_until_one_is_accepted() -> None:
    clock = Clock()
    refusals = Refusals(BatchingConfig(max_requests=8), monotonic=clock)
    waits = [not_sent(refusals) for _ in range(8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert refusals.held_s() == 60.0
    clock.now += 60.0
    assert refusals.held_s() is None
    assert refusals.plan(8).picks == (Pick(8),)  # nothing about the requests was learned
    refusals.create_sent()
    assert refusals.create_accepted("msgbatch_1", one(1, 2)) is None
    assert not_sent(refusals) == 1.0  # reachable in between: the wait starts over


def test_an_answer_from_the_api_starts_the_wait_over() -> None:
    refusals = Refusals(BatchingConfig(max_requests=8), monotonic=Clock())
    assert [not_sent(refusals) for _ in range(3)] == [1.0, 2.0, 4.0]
    refused = RateLimitError(
        method="POST",
        path="/v1/messages/batches",
        status=429,
        error_type="rate_limit_error",
        message="slow down",
        request_id=None,
        retry_after_s=2.0,
    )
    sent = one(1)
    refusals.create_sent()
    refusals.put_back(sent, refusals.diagnose(sent, refused))
    assert not_sent(refusals) == 1.0


def test_a_probe_due_after_a_pause_is_still_due_when_its_create_was_not_sent() -> None:
    clock = Clock()
    refusals = Refusals(BatchingConfig(max_requests=8), monotonic=clock)
    for task_id in (1, 2, 3):  # three lone refusals in a row: creates pause
        sent = one(task_id)
        refusals.create_sent()
        exc = BadRequestError(
            method="POST",
            path="/v1/messages/batches",
            status=400,
            error_type="invalid_request_error",
            message="no credit",
            request_id=None,
        )
        refusals.put_back(sent, refusals.diagnose(sent, exc))
    clock.now += 60.0
    probe = refusals.plan(8)
    assert probe.picks[0] == Pick(1, exclude=frozenset({1, 2, 3}), after=3)
    not_sent(refusals)
    assert refusals.plan(8) == probe
