"""The state machine with an injected clock: counts, end, cancel, expiry, archive (§2, §7)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from batchd.api.wire import request_total
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.results import result_chunks
from batchd.fakeapi.state import ApiError, FakeBatch, FakeState, Timeline
from batchd.fakeapi.validation import parse_create_body
from tests.support.fakeapi import requests_body


class ManualClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_state(**timeline: Any) -> tuple[FakeState, ManualClock]:
    clock = ManualClock()
    return FakeState(clock=clock, timeline=Timeline(**timeline), seed=3), clock


def create(state: FakeState, count: int, faults: FaultConfig | None = None) -> FakeBatch:
    parsed = parse_create_body(orjson.dumps(requests_body(count)))
    return state.create(parsed, faults or FaultConfig())


def lines(state: FakeState, batch: FakeBatch) -> list[dict[str, Any]]:
    body = b"".join(result_chunks(batch, state.timeline, chunk_bytes=1000))
    return [orjson.loads(line) for line in body.splitlines()]


def result_types(state: FakeState, batch: FakeBatch) -> list[str]:
    return [line["result"]["type"] for line in lines(state, batch)]


def test_counts_stay_in_processing_until_the_end_by_default() -> None:
    state, clock = make_state(processing_seconds=10.0)
    batch = create(state, 100)
    for _ in range(9):
        clock.advance(1.0)
        view = batch.view(clock(), state.timeline, "http://x")
        assert view["processing_status"] == "in_progress"
        assert view["request_counts"]["processing"] == 100
    clock.advance(1.0)
    view = batch.view(clock(), state.timeline, "http://x")
    assert view["processing_status"] == "ended"
    assert view["request_counts"]["succeeded"] == 100
    assert view["ended_at"] is not None
    assert datetime.fromisoformat(view["ended_at"]) <= clock()


def test_incremental_counts_move_monotonically_and_sum_to_n() -> None:
    state, clock = make_state(processing_seconds=10.0, incremental_counts=True)
    batch = create(state, 200)
    seen = []
    for _ in range(11):
        counts = batch.counts(clock(), state.timeline)
        assert request_total(counts) == 200
        seen.append(counts["succeeded"])
        clock.advance(1.0)
    assert seen == sorted(seen)
    assert 0 < seen[5] < 200
    assert seen[-1] == 200


def test_zero_processing_seconds_ends_at_once() -> None:
    state, clock = make_state(processing_seconds=0.0)
    batch = create(state, 5)
    assert batch.status(clock(), state.timeline) == "ended"


def test_expiry_ends_the_batch_and_unfinished_requests_are_expired() -> None:
    state, clock = make_state(processing_seconds=100.0, expiry_seconds=30.0)
    batch = create(state, 100)
    clock.advance(29.0)
    assert batch.status(clock(), state.timeline) == "in_progress"
    clock.advance(1.0)
    view = batch.view(clock(), state.timeline, "http://x")
    assert view["processing_status"] == "ended"
    assert view["ended_at"] == view["expires_at"]
    counts = view["request_counts"]
    assert counts["expired"] > 50
    assert counts["succeeded"] > 10
    assert counts["expired"] + counts["succeeded"] == 100
    types = result_types(state, batch)
    assert types.count("expired") == counts["expired"]


def test_cancel_with_no_delay_cancels_everything_unfinished() -> None:
    state, clock = make_state(processing_seconds=100.0, cancel_delay_seconds=0.0)
    batch = create(state, 20)
    state.cancel(batch.id)
    assert batch.counts(clock(), state.timeline)["canceled"] == 20
    assert set(result_types(state, batch)) == {"canceled"}


def test_requests_finishing_while_canceling_still_succeed() -> None:
    state, clock = make_state(processing_seconds=10.0, cancel_delay_seconds=5.0)
    batch = create(state, 100)
    state.cancel(batch.id)
    assert batch.status(clock(), state.timeline) == "canceling"
    clock.advance(5.0)
    counts = batch.counts(clock(), state.timeline)
    assert 30 < counts["succeeded"] < 70
    assert counts["succeeded"] + counts["canceled"] == 100


def test_archived_after_retention_and_results_gone() -> None:
    state, clock = make_state(processing_seconds=1.0, retention_seconds=100.0)
    batch = create(state, 3)
    clock.advance(99.0)
    assert state.results_batch(batch.id) is batch
    clock.advance(1.0)
    view = batch.view(clock(), state.timeline, "http://x")
    assert view["archived_at"] is not None
    with pytest.raises(ApiError) as raised:
        state.results_batch(batch.id)
    assert raised.value.status == 404


def test_injected_fates_mix_retryable_and_permanent_errors_and_expired() -> None:
    state, clock = make_state(processing_seconds=1.0)
    faults = FaultConfig(error_rate=0.4, expire_rate=0.2, retryable_error_share=0.5)
    batch = create(state, 1000, faults)
    clock.advance(1.0)
    counts = batch.counts(clock(), state.timeline)
    assert 300 < counts["errored"] < 500
    assert 120 < counts["expired"] < 280
    errors = [
        line["result"]["error"]
        for line in lines(state, batch)
        if line["result"]["type"] == "errored"
    ]
    kinds = {error["error"]["type"] for error in errors}
    assert kinds == {"api_error", "overloaded_error", "invalid_request_error"}
    assert all(error["request_id"].startswith("workerreq_") for error in errors)


def test_same_seed_same_ids_and_order() -> None:
    first, first_clock = make_state(processing_seconds=1.0)
    second, second_clock = make_state(processing_seconds=1.0)
    a, b = create(first, 30), create(second, 30)
    assert a.id == b.id
    first_clock.advance(1.0)
    second_clock.advance(1.0)
    assert lines(first, a) == lines(second, b)


def test_truncated_chunks_stop_midway_in_a_line() -> None:
    state, _clock = make_state(processing_seconds=0.0)
    batch = create(state, 10)
    body = b"".join(result_chunks(batch, state.timeline, truncate=True))
    assert body.count(b"\n") == 5
    assert not body.endswith(b"\n")
