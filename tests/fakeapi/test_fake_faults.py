"""Each injected fault over real HTTP, the down switch, the admin endpoints, stats."""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from batchd.fakeapi.faults import FaultConfig, FaultKind
from batchd.fakeapi.server import FakeApiServer
from tests.support.fakeapi import Api, StartFake, admin, create_with_repeats, requests_body


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("429", 429, "rate_limit_error"),
        ("500", 500, "api_error"),
        ("503", 503, "api_error"),
        ("504", 504, "timeout_error"),
        ("529", 529, "overloaded_error"),
    ],
)
async def test_status_faults_send_the_real_error_bodies(
    api: Api, fake: FakeApiServer, kind: str, status: int, error_type: str
) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=(cast(FaultKind, kind),),
        retry_after_seconds=7,
    )
    async with api.http.get(api.url) as response:
        assert response.status == status
        assert response.headers["request-id"].startswith("req_")
        body = await response.json()
        if status == 429:
            assert response.headers["retry-after"] == "7"
        else:
            assert "retry-after" not in response.headers
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert fake.faults.injected[kind] == 1


async def test_should_retry_override_header(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("500",), should_retry=False
    )
    async with api.http.get(api.url) as response:
        assert response.status == 500
        assert response.headers["x-should-retry"] == "false"


async def test_faults_hit_only_the_chosen_endpoints(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("500",), http_fault_endpoints=("retrieve",)
    )
    created = await api.create(requests_body(1))
    status, _ = await api.call("GET", f"/{created['id']}")
    assert status == 500
    status, _ = await api.call("GET")
    assert status == 200


async def test_a_fault_rate_is_a_share_of_calls(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(http_fault_rate=0.3, http_fault_kinds=("500",))
    statuses = [(await api.call("GET"))[0] for _ in range(100)]
    assert 15 < statuses.count(500) < 45
    assert set(statuses) == {200, 500}


async def test_dropped_connection_is_a_client_error(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("drop",))
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", json=requests_body(2))
    assert fake.state.batches == {}


async def test_commit_then_drop_creates_the_batch_but_the_client_never_hears(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("commit_drop",))
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", json=requests_body(3))
    assert len(fake.state.batches) == 1
    fake.faults.config = FaultConfig()
    _status, page = await api.call("GET")  # what a reconciling daemon does (§8.3)
    assert [b["request_counts"]["processing"] for b in page["data"]] == [3]
    _, stats = await admin(http, fake, "stats")
    assert stats["creates_attempted"] == 1
    assert stats["creates_accepted"] == 1
    assert stats["faults_injected"] == {"commit_drop": 1}


@pytest.mark.parametrize("how", ["rate", "kind"])
async def test_truncated_results_raise_on_the_client(
    api: Api, fake: FakeApiServer, how: str
) -> None:
    created = await api.create(requests_body(20))
    fake.clock.advance(1.0)
    if how == "rate":
        fake.faults.config = FaultConfig(results_truncate_rate=1.0)
    else:
        fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("truncate",))
    with pytest.raises(aiohttp.ClientPayloadError):
        await api.results(created["id"])
    assert fake.faults.injected["truncate"] == 1
    fake.faults.config = FaultConfig()
    assert len(await api.results(created["id"])) == 20  # the next download is whole


async def test_slow_responses_are_delayed(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("slow",), slow_seconds=0.3
    )
    started = time.monotonic()
    status, _ = await api.call("GET")
    assert status == 200
    assert time.monotonic() - started >= 0.3


async def test_down_switch_until_its_deadline(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    status, body = await admin(http, fake, "down", {"seconds": 60})
    assert status == 200
    assert "down_until" in body
    status, error = await api.call("GET")
    assert status == 503
    assert error["error"]["type"] == "api_error"
    status, _ = await admin(http, fake, "stats")  # control endpoints stay up
    assert status == 200
    status, body = await admin(http, fake, "advance", {"seconds": 60})
    assert status == 200
    status, _ = await api.call("GET")
    assert status == 200
    await admin(http, fake, "down", {"seconds": 60, "mode": "drop"})
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("GET")


async def test_transient_404_right_after_create(api: Api, fake: FakeApiServer) -> None:
    fake.faults.config = FaultConfig(not_found_after_create_seconds=5.0)
    created = await api.create(requests_body(1))
    status, error = await api.call("GET", f"/{created['id']}")
    assert status == 404
    assert error["error"]["type"] == "not_found_error"
    fake.clock.advance(5.0)
    status, _ = await api.call("GET", f"/{created['id']}")
    assert status == 200


async def test_faults_endpoint_replaces_the_config(
    fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    status, body = await admin(
        http,
        fake,
        "faults",
        {"http_fault_rate": 0.5, "http_fault_kinds": "429,drop", "http_fault_endpoints": "all"},
    )
    assert status == 200
    assert body["http_fault_kinds"] == ["429", "drop"]
    assert fake.faults.config.http_fault_rate == 0.5
    assert len(fake.faults.config.http_fault_endpoints) == 6
    _, body = await admin(http, fake, "faults")
    assert body["http_fault_rate"] == 0.5
    status, error = await admin(http, fake, "faults", {"no_such_setting": 1})
    assert status == 400
    assert "no_such_setting" in error["error"]["message"]
    status, error = await admin(http, fake, "faults", {"http_fault_kinds": ["418"]})
    assert status == 400
    assert "418" in error["error"]["message"]


async def test_stats_report_duplicate_submissions_only(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    await create_with_repeats(api)
    status, stats = await admin(http, fake, "stats")
    assert status == 200
    assert stats["creates_attempted"] == 2
    assert stats["creates_accepted"] == 2
    assert stats["batches"] == 2
    assert stats["requests_received"] == 6
    assert stats["submissions_by_custom_id"] == {"req-0": 2, "req-1": 2}
    assert stats["faults_injected"] == {}


async def test_state_file_survives_a_restart(
    start_fake: StartFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "fake-state.json"
    first = await start_fake(state_path=path, processing_seconds=5.0)
    api = Api(http, first)
    kept = await api.create(requests_body(4))
    canceled = await api.create(requests_body(2, prefix="c"))
    await api.call("POST", f"/{canceled['id']}/cancel")
    await admin(http, first, "advance", {"seconds": 5})
    before = await api.results(kept["id"])
    await first.stop()

    second = await start_fake(state_path=path, processing_seconds=5.0)
    api = Api(http, second)
    assert (await api.retrieve(kept["id"]))["processing_status"] == "ended"
    assert await api.results(kept["id"]) == before
    assert {line["result"]["type"] for line in await api.results(canceled["id"])} <= {
        "canceled",
        "succeeded",
    }
    _, page = await api.call("GET")
    assert [b["id"] for b in page["data"]] == [canceled["id"], kept["id"]]
    newer = await api.create(requests_body(1, prefix="n"))
    assert newer["id"] not in (kept["id"], canceled["id"])
    _, stats = await admin(http, second, "stats")
    assert stats["creates_accepted"] == 3
    assert stats["requests_received"] == 7
