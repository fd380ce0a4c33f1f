"""The six endpoints over real HTTP: shapes, headers, status codes, messages (spec §1-§3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.api.wire import BATCHES_PATH, parse_timestamp
from batchd.fakeapi.server import FakeApiServer
from tests.support.fakeapi import HEADERS, Api, StartFake, params, requests_body

BATCH_KEYS = [
    "id",
    "type",
    "processing_status",
    "request_counts",
    "ended_at",
    "created_at",
    "expires_at",
    "archived_at",
    "cancel_initiated_at",
    "results_url",
]


def assert_request_id(response: aiohttp.ClientResponse) -> None:
    request_id = response.headers["request-id"]
    assert request_id.startswith("req_")
    assert len(request_id) == 4 + 24


async def test_create_returns_200_with_an_in_progress_batch_every_field_present(api: Api) -> None:
    async with api.http.post(api.url, json=requests_body(3)) as response:
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert_request_id(response)
        batch = await response.json()
    assert list(batch) == BATCH_KEYS  # all nullable fields sent explicitly, §2 order
    assert batch["id"].startswith("msgbatch_")
    assert len(batch["id"]) == 9 + 24
    assert batch["id"][9:].isalnum()
    assert batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress"
    assert batch["request_counts"] == {
        "processing": 3,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch["ended_at"] is None
    assert batch["results_url"] is None
    assert batch["archived_at"] is None
    assert batch["cancel_initiated_at"] is None
    created, expires = parse_timestamp(batch["created_at"]), parse_timestamp(batch["expires_at"])
    assert (expires - created).total_seconds() == 24 * 3600
    assert batch["created_at"].endswith("+00:00")
    assert "." in batch["created_at"]


async def test_retrieve_ends_with_results_url_pointing_at_the_fake(
    api: Api, fake: FakeApiServer
) -> None:
    created = await api.create(requests_body(2))
    fake.clock.advance(1.0)
    batch = await api.retrieve(created["id"])
    assert batch["processing_status"] == "ended"
    assert batch["request_counts"]["succeeded"] == 2
    assert batch["ended_at"] is not None
    assert batch["results_url"] == f"{fake.base_url}{BATCHES_PATH}/{created['id']}/results"
    lines = await api.results(created["id"])
    assert sorted(line["custom_id"] for line in lines) == ["req-0", "req-1"]


async def test_results_body_is_jsonl_with_a_trailing_newline(api: Api, fake: FakeApiServer) -> None:
    created = await api.create(requests_body(2))
    fake.clock.advance(1.0)
    async with api.http.get(f"{api.url}/{created['id']}/results") as response:
        body = await response.read()
        assert_request_id(response)
    assert body.endswith(b"\n")
    assert body.count(b"\n") == 2


async def test_results_before_the_end_is_404_not_retryable(api: Api) -> None:
    created = await api.create(requests_body(1))
    async with api.http.get(f"{api.url}/{created['id']}/results") as response:
        assert response.status == 404
        assert response.headers["x-should-retry"] == "false"
        body = await response.json()
    assert body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": f"Message Batch {created['id']} has no available results.",
        },
        "request_id": response.headers["request-id"],
    }


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("POST", "/cancel"), ("DELETE", ""), ("GET", "/results")],
)
async def test_unknown_batch_is_404_naming_it(api: Api, method: str, suffix: str) -> None:
    missing = "msgbatch_01NoSuchBatch0000000000000"
    async with api.http.request(method, f"{api.url}/{missing}{suffix}") as response:
        assert response.status == 404
        assert response.headers["x-should-retry"] == "false"
        body = await response.json()
    assert body["error"] == {
        "type": "not_found_error",
        "message": f"Message Batch {missing} not found.",
    }


async def test_list_is_newest_first_and_pages_both_ways(api: Api) -> None:
    ids = [(await api.create(requests_body(1, prefix=f"b{n}")))["id"] for n in range(5)]
    newest_first = ids[::-1]
    status, page = await api.call("GET", params={"limit": "2"})
    assert status == 200
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[1])
    status, page = await api.call("GET", params={"limit": "2", "after_id": newest_first[1]})
    assert [b["id"] for b in page["data"]] == newest_first[2:4]
    assert page["has_more"] is True
    status, page = await api.call("GET", params={"limit": "2", "after_id": newest_first[3]})
    assert [b["id"] for b in page["data"]] == newest_first[4:]
    assert page["has_more"] is False
    status, page = await api.call("GET", params={"limit": "2", "before_id": newest_first[4]})
    assert [b["id"] for b in page["data"]] == newest_first[2:4]
    assert page["has_more"] is True
    status, page = await api.call("GET", params={"limit": "2", "before_id": newest_first[1]})
    assert [b["id"] for b in page["data"]] == newest_first[:1]
    assert page["has_more"] is False
    status, page = await api.call("GET")
    assert len(page["data"]) == 5
    assert page["has_more"] is False


async def test_empty_list_has_null_cursors(api: Api) -> None:
    status, page = await api.call("GET")
    assert status == 200
    assert page == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("0", "limit: Input should be greater than or equal to 1"),
        ("1001", "limit: Input should be less than or equal to 1000"),
        ("x", "limit: Input should be a valid integer, unable to parse string as an integer"),
    ],
)
async def test_list_limit_outside_1_to_1000_is_400(api: Api, limit: str, message: str) -> None:
    status, body = await api.call("GET", params={"limit": limit})
    assert status == 400
    assert body["error"] == {"type": "invalid_request_error", "message": message}


async def test_list_accepts_limit_1000(api: Api) -> None:
    status, _ = await api.call("GET", params={"limit": "1000"})
    assert status == 200


async def test_cancel_goes_through_canceling_to_ended_with_canceled_lines(
    start_fake: StartFake, http: aiohttp.ClientSession
) -> None:
    fake = await start_fake(processing_seconds=100.0, cancel_delay_seconds=2.0)
    api = Api(http, fake)
    created = await api.create(requests_body(50))
    fake.clock.advance(10.0)  # about a tenth of the requests are done
    status, canceling = await api.call("POST", f"/{created['id']}/cancel")
    assert status == 200
    assert canceling["processing_status"] == "canceling"
    assert canceling["cancel_initiated_at"] is not None
    assert canceling["request_counts"]["processing"] == 50  # §7.2 captured
    assert canceling["ended_at"] is None
    assert canceling["results_url"] is None
    status, again = await api.call("POST", f"/{created['id']}/cancel")  # idempotent
    assert status == 200
    assert again["cancel_initiated_at"] == canceling["cancel_initiated_at"]
    fake.clock.advance(2.0)
    ended = await api.retrieve(created["id"])
    assert ended["processing_status"] == "ended"
    counts = ended["request_counts"]
    assert counts["canceled"] > 30
    assert counts["succeeded"] > 0
    assert counts["canceled"] + counts["succeeded"] == 50
    lines = await api.results(created["id"])
    kinds = [line["result"]["type"] for line in lines]
    assert kinds.count("canceled") == counts["canceled"]
    assert {"type": "canceled"} in [line["result"] for line in lines]
    status, body = await api.call("POST", f"/{created['id']}/cancel")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"


async def test_delete_refuses_unended_then_deletes(api: Api, fake: FakeApiServer) -> None:
    created = await api.create(requests_body(1))
    status, body = await api.call("DELETE", f"/{created['id']}")
    assert status == 400
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "In progress batches cannot be deleted. Consider canceling the batch instead.",
    }
    fake.clock.advance(1.0)
    status, body = await api.call("DELETE", f"/{created['id']}")
    assert status == 200
    assert body == {"id": created["id"], "type": "message_batch_deleted"}
    status, _ = await api.call("GET", f"/{created['id']}")
    assert status == 404


async def test_401_without_key_and_with_a_wrong_key_when_one_is_required(
    start_fake: StartFake,
) -> None:
    open_fake = await start_fake()
    locked = await start_fake(api_key="sk-right")
    async with aiohttp.ClientSession() as session:
        for headers, server, expected in [
            ({}, open_fake, 401),
            ({"x-api-key": ""}, open_fake, 401),
            ({"x-api-key": "anything"}, open_fake, 200),
            ({"authorization": "Bearer tok"}, open_fake, 200),
            ({"x-api-key": "sk-wrong"}, locked, 401),
            ({"authorization": "Bearer sk-wrong"}, locked, 401),
            ({"x-api-key": "sk-right"}, locked, 200),
            ({"authorization": "Bearer sk-right"}, locked, 200),
        ]:
            async with session.get(server.base_url + BATCHES_PATH, headers=headers) as response:
                assert response.status == expected, headers
                assert_request_id(response)
                if expected == 401:
                    assert response.headers["x-should-retry"] == "false"
                    body = await response.json()
                    assert body["error"] == {
                        "type": "authentication_error",
                        "message": "invalid x-api-key",
                    }


def one(custom_id: Any = "ok", **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"custom_id": custom_id, "params": params("hi")}
    request.update(extra)
    return request


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"requests": []}, "requests: List should have at least 1 item after validation, not 0"),
        ({}, "requests: Field required"),
        ({"requests": {}}, "requests: Input should be a valid list"),
        ({"requests": [one(), {"params": params("x")}]}, "requests.1.custom_id: Field required"),
        (
            {"requests": [one("x" * 65)]},
            "requests.0.custom_id: String should have at most 64 characters",
        ),
        (
            {"requests": [one("a"), one("b"), one("bad id!")]},
            "requests.2.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            {"requests": [one("a"), one("dup"), one("dup")]},
            "requests: custom_id's must be unique within a batch. Duplicate custom_id found: dup",
        ),
        (
            {"requests": [one(""), one()]},
            "requests.0.custom_id: String should have at least 1 character",
        ),
        ({"requests": [one(5)]}, "requests.0.custom_id: Input should be a valid string"),
        ({"requests": [{"custom_id": "a"}]}, "requests.0.params: Field required"),
        ({"requests": [one(), 7]}, "requests.1: Input should be a valid dictionary"),
    ],
)
async def test_create_envelope_errors_are_400_with_the_captured_message(
    api: Api, body: dict[str, Any], message: str
) -> None:
    status, error = await api.call("POST", json=body)
    assert status == 400
    assert error["type"] == "error"
    assert error["error"] == {"type": "invalid_request_error", "message": message}
    assert error["request_id"].startswith("req_")
    assert api.server.state.batches == {}


async def test_more_than_100000_requests_is_400(api: Api) -> None:
    body = {"requests": [{"custom_id": f"c{n}", "params": {}} for n in range(100_001)]}
    status, error = await api.call("POST", json=body)
    assert status == 400
    assert error["error"]["message"] == (
        "requests: List should have at most 100000 items after validation, not 100001"
    )


async def test_body_that_is_not_json_is_400(api: Api) -> None:
    status, error = await api.call(
        "POST", data=b'{"requests": [', headers={"content-type": "application/json"}
    )
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("The request body is not valid JSON: ")


async def test_body_over_the_limit_is_413_by_content_length_before_reading(
    api: Api, fake: FakeApiServer
) -> None:
    sent = 0

    async def slow_body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(300):  # would be 300 MB; the 413 arrives long before
            sent += 1 << 20
            yield b" " * (1 << 20)

    headers = {**HEADERS, "content-length": str(256_000_001)}
    async with api.http.post(api.url, data=slow_body(), headers=headers) as response:
        assert response.status == 413
        body = await response.json()
    assert body["error"]["type"] == "request_too_large"
    assert sent < 256_000_000
    assert fake.state.batches == {}


async def test_chunked_body_over_the_limit_is_413_while_reading(
    start_fake: StartFake, http: aiohttp.ClientSession
) -> None:
    fake = await start_fake(max_body_bytes=10_000)

    async def chunks() -> AsyncIterator[bytes]:
        yield orjson.dumps(requests_body(200))  # ~20 KB, no Content-Length: chunked

    async with http.post(fake.base_url + BATCHES_PATH, data=chunks()) as response:
        assert response.status == 413
        body = await response.json()
    assert body["error"]["type"] == "request_too_large"


async def test_bad_params_are_accepted_and_come_back_errored_with_nested_error(
    start_fake: StartFake, http: aiohttp.ClientSession
) -> None:
    fake = await start_fake(models=("claude-haiku-4-5-20251001",))
    api = Api(http, fake)
    good = params("fine")
    cases = {
        "no-model": (
            {k: v for k, v in good.items() if k != "model"},
            "invalid_request_error",
            "model: Field required",
        ),
        "no-messages": (
            {k: v for k, v in good.items() if k != "messages"},
            "invalid_request_error",
            "messages: Field required",
        ),
        "no-max-tokens": (
            {k: v for k, v in good.items() if k != "max_tokens"},
            "invalid_request_error",
            "max_tokens: Field required",
        ),
        "zero-tokens": (
            {**good, "max_tokens": 0},
            "invalid_request_error",
            "max_tokens: must be greater than or equal to 1",
        ),
        "stream": (
            {**good, "stream": True},
            "invalid_request_error",
            '"stream=True" is not supported in the Message Batches API',
        ),
        "unknown-model": (
            {**good, "model": "claude-does-not-exist-9"},
            "not_found_error",
            "model: claude-does-not-exist-9",
        ),
    }
    body = {"requests": [{"custom_id": cid, "params": p} for cid, (p, _, _) in cases.items()]}
    body["requests"].append({"custom_id": "good", "params": good})
    created = await api.create(body)
    assert created["request_counts"]["processing"] == 7  # accepted, not a 400
    fake.clock.advance(1.0)
    ended = await api.retrieve(created["id"])
    assert ended["request_counts"]["errored"] == 6
    assert ended["request_counts"]["succeeded"] == 1
    lines = {line["custom_id"]: line["result"] for line in await api.results(created["id"])}
    assert lines["good"]["type"] == "succeeded"
    for custom_id, (_, error_type, message) in cases.items():
        result = lines[custom_id]
        assert result["type"] == "errored"
        assert result["error"]["type"] == "error"
        assert result["error"]["request_id"] is None
        assert result["error"]["error"]["type"] == error_type
        assert result["error"]["error"]["message"] == message
        assert "usage" not in result


async def test_succeeded_message_looks_real_and_echoes_the_user_text(
    api: Api, fake: FakeApiServer
) -> None:
    text = "Describe product number 42 in one line"
    body = {"requests": [{"custom_id": "p42", "params": params(text, max_tokens=500)}]}
    created = await api.create(body)
    fake.clock.advance(1.0)
    [line] = await api.results(created["id"])
    message = line["result"]["message"]
    assert message["id"].startswith("msg_")
    assert len(message["id"]) == 4 + 24
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == params(text)["model"]
    assert message["content"][0]["type"] == "text"
    assert text in message["content"][0]["text"]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    usage = message["usage"]
    assert usage["input_tokens"] == len(orjson.dumps(body["requests"][0]["params"])) // 4
    assert 0 < usage["output_tokens"] <= 500
    assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
    assert usage["service_tier"] == "batch"


async def test_results_are_shuffled_and_the_same_on_every_download(
    api: Api, fake: FakeApiServer
) -> None:
    created = await api.create(requests_body(40))
    fake.clock.advance(1.0)
    first = await api.results(created["id"])
    second = await api.results(created["id"])
    order = [line["custom_id"] for line in first]
    assert order != [f"req-{n}" for n in range(40)]
    assert sorted(order) == sorted(f"req-{n}" for n in range(40))
    assert first == second
    for line in first:
        n = line["custom_id"].removeprefix("req-")
        assert f"question req {n}" in line["result"]["message"]["content"][0]["text"]


async def test_unknown_route_is_a_json_404_with_request_id(api: Api) -> None:
    async with api.http.get(api.server.base_url + "/v1/nothing") as response:
        assert response.status == 404
        assert_request_id(response)
        body = await response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
