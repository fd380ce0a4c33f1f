"""The refusal state machine alone, driven as the submitter drives it: no store, no API.

The submitter's own tests (test_submit_refusals, test_bisect) prove the behaviour end to
end against the fake API; these pin the API the submitter uses, step by step.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchd.api import ApiStatusError, BadRequestError, RateLimitError
from batchd.config import BatchingConfig
from batchd.pipeline.chunker import Chunk
from batchd.pipeline.refusals import Pick, Plan, Refusals, Suspect


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def refusals(clock: Clock) -> Refusals:
    return Refusals(BatchingConfig(max_requests=8), monotonic=clock)


_made: list[Chunk] = []


@pytest.fixture(autouse=True)
def _close_bodies() -> Iterator[None]:
    yield
    while _made:
        _made.pop().body.close()


def one(*task_ids: int) -> Chunk:
    """A chunk of these tasks, as the chunker would build it (the body stays empty)."""
    made = Chunk(list(task_ids), [f"t-{n}" for n in task_ids], [f"v{n}" for n in task_ids])
    _made.append(made)
    return made


def refusal(
    kind: type[ApiStatusError], message: str, retry_after_s: float | None = None
) -> ApiStatusError:
    status = {BadRequestError: 400, RateLimitError: 429}[kind]
    return kind(
        method="POST",
        path="/v1/messages/batches",
        status=status,
        error_type="invalid_request_error",
        message=message,
        request_id=None,
        retry_after_s=retry_after_s,
    )


def refuse(refusals: Refusals, sent: Chunk, exc: ApiStatusError) -> float | None:
    """A create refused: diagnosed, its intent released, put back. The wait returned."""
    refusals.create_sent()
    return refusals.put_back(sent, refusals.diagnose(sent, exc))


def accept(refusals: Refusals, sent: Chunk) -> Suspect | None:
    """A create accepted: the culprit it proves, if any."""
    refusals.create_sent()
    return refusals.create_accepted("msgbatch_1", sent)


def test_a_400_naming_nobody_halves_batches_until_one_reaches_its_end(refusals: Refusals) -> None:
    assert refuse(refusals, one(*range(1, 9)), refusal(BadRequestError, "bad")) is None
    assert refusals.max_requests_cap == 4
    assert refusals.plan(8) == Plan((Pick(8),))  # the submitter applies the cap to limit
    assert accept(refusals, one(1, 2, 3, 4)) is None
    assert refusals.max_requests_cap == 4  # the refused batch's end not reached yet
    assert accept(refusals, one(5, 6, 7, 8)) is None
    assert refusals.max_requests_cap is None


def test_a_400_naming_a_request_judges_that_task_only(refusals: Refusals) -> None:
    sent = one(4, 5, 6)
    diagnosis = refusals.diagnose(sent, refusal(BadRequestError, "requests.1.params: no"))
    assert diagnosis.invalid == [("t-5", "refused by the API: requests.1.params: no")]
    assert refusals.put_back(sent, diagnosis) is None
    assert refusals.max_requests_cap is None


def test_a_lone_refusal_is_a_suspect_blamed_once_a_control_is_accepted(refusals: Refusals) -> None:
    assert refuse(refusals, one(3), refusal(BadRequestError, "bad")) is None
    assert refusals.plan(8) == Plan((Pick(1, exclude=frozenset({3})),), control=True)
    culprit = accept(refusals, one(4))
    assert culprit is not None
    assert (culprit.task_id, culprit.reason) == (3, "refused by the API: bad")
    assert culprit.version == "v3"  # the row as read for the refused create: blamed only so
    assert refusals.plan(8) == Plan((Pick(8),))  # judged: full batches again


def test_three_suspects_in_a_row_pause_creates_longer_each_time(
    refusals: Refusals, clock: Clock
) -> None:
    for task_id in (1, 2):
        assert refuse(refusals, one(task_id), refusal(BadRequestError, "no credit")) is None
    assert refuse(refusals, one(3), refusal(BadRequestError, "no credit")) == 60.0
    assert refusals.held_s() == 60.0
    clock.now += 60.0
    assert refusals.held_s() is None
    suspects = frozenset({1, 2, 3})
    # The probe walks on after the last task refused alone.
    assert refusals.plan(8).picks[0] == Pick(1, exclude=suspects, after=3)
    assert refuse(refusals, one(4), refusal(BadRequestError, "no credit")) == 120.0
    clock.now += 120.0
    # Accepted after the pause: nobody is blamed, the suspects go out in full batches.
    assert accept(refusals, one(5)) is None
    assert refusals.suspect_to_retry() is None
    assert refusals.plan(8) == Plan((Pick(8),))


def test_several_suspects_are_each_retried_alone_after_a_control(refusals: Refusals) -> None:
    for task_id in (1, 2):
        refuse(refusals, one(task_id), refusal(BadRequestError, "bad"))
    assert accept(refusals, one(3)) is None
    assert refusals.suspect_to_retry() == 1
    refusals.retry_dropped(1)  # canceled meanwhile
    assert refusals.suspect_to_retry() == 2
    assert accept(refusals, one(2)) is None  # innocent
    assert refusals.suspect_to_retry() is None


def test_429_waits_honour_retry_after_with_a_floor_else_double(refusals: Refusals) -> None:
    assert refuse(refusals, one(1, 2), refusal(RateLimitError, "slow", 0.2)) == 1.0
    assert refuse(refusals, one(1, 2), refusal(RateLimitError, "slow")) == 10.0
    assert accept(refusals, one(1, 2)) is None
    assert refuse(refusals, one(3), refusal(RateLimitError, "slow")) == 5.0
