"""The faults a reconciling client meets: a list that lags, a create committed late, a cap
on injected faults, every custom_id's submission count, and a second client on the key."""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from batchd.fakeapi.faults import DEFAULT_FAULT_KINDS, FaultConfig
from batchd.fakeapi.server import FakeApiServer, add_arguments, config_from_args
from tests.support.fakeapi import (
    HEADERS,
    Api,
    StartFake,
    admin,
    create_with_repeats,
    requests_body,
    spawn,
    start_process,
)
from tests.support.foreign import create_foreign_batches


async def listed_ids(api: Api, **query: str) -> list[str]:
    status, page = await api.call("GET", params=query)
    assert status == 200, page
    return [batch["id"] for batch in page["data"]]


async def wait_for(condition: Any, timeout_s: float) -> float:
    """Seconds until `condition()` held, polling every 20 ms; fails past `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition never held"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_the_new_faults_are_off_by_default() -> None:
    defaults = FaultConfig()
    assert defaults.list_lag_seconds == 0
    assert defaults.http_fault_rate == 0
    assert defaults.http_fault_limit == 0
    assert "late_create" not in DEFAULT_FAULT_KINDS
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).faults == defaults


async def test_off_by_default_a_create_is_listed_at_once(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    _, faults = await admin(http, fake, "faults")
    assert faults["list_lag_seconds"] == 0
    created = await api.create(requests_body(2))
    assert await listed_ids(api) == [created["id"]]
    _, stats = await admin(http, fake, "stats")
    assert stats["creates_pending"] == 0
    assert stats["faults_injected"] == {}


async def test_list_lag_hides_a_new_batch_then_shows_it(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    old = await api.create(requests_body(1, prefix="old"))
    fake.clock.advance(60)
    status, body = await admin(http, fake, "faults", {"list_lag_seconds": 30})
    assert status == 200
    assert body["list_lag_seconds"] == 30
    new = await api.create(requests_body(3, prefix="new"))

    status, page = await api.call("GET")
    assert status == 200
    assert [b["id"] for b in page["data"]] == [old["id"]]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (old["id"], old["id"], False)
    assert (await api.retrieve(new["id"]))["id"] == new["id"]  # retrieve by id at once
    assert await listed_ids(api, before_id=old["id"]) == []  # hidden from every page
    fake.clock.advance(29)
    assert await listed_ids(api) == [old["id"]]
    _, stats = await admin(http, fake, "stats")
    assert stats["faults_injected"] == {"list_lag": 3}

    fake.clock.advance(1)  # 30 s old: listed, newest first
    assert await listed_ids(api) == [new["id"], old["id"]]
    await admin(http, fake, "faults", {})  # back to the defaults: no lag at all
    newest = await api.create(requests_body(1, prefix="newest"))
    assert await listed_ids(api) == [newest["id"], new["id"], old["id"]]


async def test_late_create_drops_the_connection_then_commits(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    status, _ = await admin(
        http,
        fake,
        "faults",
        {"http_fault_rate": 1.0, "http_fault_kinds": ["late_create"], "late_create_seconds": 0.5},
    )
    assert status == 200
    sent = time.monotonic()
    sent_at = fake.clock()
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", json=requests_body(3))

    # Dropped, not committed: nothing to see, nothing submitted yet.
    assert fake.state.batches == {}
    assert await listed_ids(api) == []
    _, stats = await admin(http, fake, "stats")
    assert (stats["creates_attempted"], stats["creates_accepted"]) == (1, 0)
    assert stats["creates_pending"] == 1
    assert stats["batches"] == 0
    assert stats["submission_counts"] == {}
    assert stats["faults_injected"] == {"late_create": 1}

    await wait_for(lambda: len(fake.state.batches) == 1, timeout_s=10)
    committed = time.monotonic()
    assert committed - sent >= 0.5
    _, stats = await admin(http, fake, "stats")
    assert (stats["creates_attempted"], stats["creates_accepted"]) == (1, 1)
    assert stats["creates_pending"] == 0
    assert stats["requests_received"] == 3
    assert stats["submission_counts"] == {"req-0": 1, "req-1": 1, "req-2": 1}
    await admin(http, fake, "faults", {})
    status, page = await api.call("GET")
    assert [b["request_counts"]["processing"] for b in page["data"]] == [3]
    # Created when committed, half a second later, not when the POST came in.
    created_at = datetime.fromisoformat(page["data"][0]["created_at"])
    assert (created_at - sent_at).total_seconds() >= 0.5


async def test_a_late_create_of_an_invalid_body_is_refused_and_never_committed(
    api: Api, fake: FakeApiServer
) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("late_create",), late_create_seconds=0.1
    )
    status, error = await api.call("POST", json={"requests": [{"custom_id": "bad id!"}]})
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert fake.api.pending_creates == set()
    await asyncio.sleep(0.3)
    assert fake.state.batches == {}


async def test_a_late_create_still_pending_when_the_fake_stops_never_happens(
    start_fake: StartFake, http: aiohttp.ClientSession
) -> None:
    server = await start_fake()
    server.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("late_create",), late_create_seconds=30
    )
    with pytest.raises(aiohttp.ClientConnectionError):
        await Api(http, server).call("POST", json=requests_body(2))
    (pending,) = server.api.pending_creates
    await server.stop()
    assert pending.cancelled()
    assert server.state.batches == {}
    assert server.state.stats.creates_accepted == 0


async def test_late_create_only_applies_to_create(api: Api, fake: FakeApiServer) -> None:
    created = await api.create(requests_body(1))
    fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("late_create",))
    assert await listed_ids(api) == [created["id"]]
    assert (await api.retrieve(created["id"]))["id"] == created["id"]
    assert fake.faults.injected == {}


async def test_a_fault_limit_drops_the_next_create_only(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    settings = {"http_fault_rate": 1.0, "http_fault_kinds": ["commit_drop"], "http_fault_limit": 1}
    status, body = await admin(http, fake, "faults", settings)
    assert (status, body["http_fault_limit"]) == (200, 1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", json=requests_body(2))
    second = await api.create(requests_body(2))  # the limit is spent: answered
    third = await api.create(requests_body(2))
    assert len(fake.state.batches) == 3
    assert fake.faults.injected == {"commit_drop": 1}
    await admin(http, fake, "faults", settings)  # a new configuration, a fresh limit
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.call("POST", json=requests_body(2))
    await api.create(requests_body(2))
    assert fake.faults.injected == {"commit_drop": 2}
    _, stats = await admin(http, fake, "stats")
    assert stats["submission_counts"] == {"req-0": 5, "req-1": 5}
    assert second["id"] != third["id"]


async def test_bad_new_settings_are_refused(
    fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for setting in ("list_lag_seconds", "late_create_seconds", "http_fault_limit"):
        status, error = await admin(http, fake, "faults", {setting: -1})
        assert status == 400
        assert f"{setting} must be a number >= 0" in error["error"]["message"]
    assert fake.faults.config == FaultConfig()


async def test_stats_give_the_submission_count_of_every_custom_id(
    api: Api, fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    await create_with_repeats(api)
    _, stats = await admin(http, fake, "stats")
    assert stats["submission_counts"] == {"req-0": 2, "req-1": 2, "req-2": 1, "fresh": 1}
    assert stats["submissions_by_custom_id"] == {"req-0": 2, "req-1": 2}  # kept as it was


async def test_the_cli_options_set_the_new_faults_on_a_real_process() -> None:
    process, base_url = await start_process(
        "--list-lag-seconds",
        "30",
        "--fault-rate",
        "1",
        "--fault-kinds",
        "late_create",
        "--late-create-seconds",
        "0.3",
        "--fault-limit",
        "1",
    )
    try:
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.get(f"{base_url}/_fake/faults") as response:
                faults = await response.json()
            assert faults["list_lag_seconds"] == 30
            assert faults["late_create_seconds"] == 0.3
            assert (faults["http_fault_kinds"], faults["http_fault_limit"]) == (["late_create"], 1)
            url = f"{base_url}/v1/messages/batches"
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.post(url, json=requests_body(2)):
                    pass
            async with http.post(url, json=requests_body(1, prefix="b")) as response:
                assert response.status == 200  # the limit of one fault is spent
                answered = await response.json()

            async def stats() -> dict[str, Any]:
                async with http.get(f"{base_url}/_fake/stats") as response:
                    body: dict[str, Any] = await response.json()
                    return body

            started = time.monotonic()
            while (await stats())["creates_accepted"] < 2:
                assert time.monotonic() - started < 10, "the late create never committed"
                await asyncio.sleep(0.05)
            async with http.get(url) as response:
                assert (await response.json())["data"] == []  # both younger than 30 s
            async with http.get(f"{url}/{answered['id']}") as response:
                assert response.status == 200
            assert (await stats())["submission_counts"] == {"req-0": 1, "req-1": 1, "b-0": 1}
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--list-lag-seconds", "-1"), ("--late-create-seconds", "-2"), ("--fault-limit", "-1")],
)
async def test_negative_cli_settings_exit_2(flag: str, value: str) -> None:
    process = await spawn(flag, value)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert b"must be a number >= 0" in stderr


async def test_a_second_client_creates_batches_at_the_given_times(
    api: Api, fake: FakeApiServer
) -> None:
    created = await create_foreign_batches(fake.base_url, [2, 3, 2], at=[0.0, 0.3, 0.6])
    assert [batch.request_count for batch in created] == [2, 3, 2]
    assert all(batch.failure is None and batch.batch_id for batch in created)
    # asyncio may wake a timer up to its clock's resolution early: 10 ms of slack.
    assert created[1].sent_after >= 0.29
    assert created[2].sent_after >= 0.59
    assert created[1].custom_ids == ("foreign-1-0", "foreign-1-1", "foreign-1-2")
    assert await listed_ids(api) == [batch.batch_id for batch in reversed(created)]
    assert fake.state.stats.submissions["foreign-2-1"] == 1


async def test_a_second_client_reports_a_dropped_create_and_never_retries(
    fake: FakeApiServer,
) -> None:
    fake.faults.config = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("commit_drop",), http_fault_limit=1
    )
    first, second = await create_foreign_batches(
        fake.base_url, [2, 2], at=[0.0, 0.2], custom_id=lambda batch, n: f"task-{n}"
    )
    assert first.batch_id is None
    assert first.failure is not None
    assert first.failure.startswith("ServerDisconnectedError")
    assert second.batch_id is not None
    assert second.custom_ids == ("task-0", "task-1")  # ids chosen by the test: collisions
    assert len(fake.state.batches) == 2  # the dropped one was committed, and sent once
    assert fake.state.stats.submissions == {"task-0": 2, "task-1": 2}
