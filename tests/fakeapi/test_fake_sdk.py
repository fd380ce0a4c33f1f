"""Conformance: the official SDK and the guide's curl calls work against the fake."""

from __future__ import annotations

import anthropic
import pytest
from anthropic.types import TextBlock
from anthropic.types.messages import (
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchErroredResult,
    MessageBatchSucceededResult,
)

from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiServer
from tests.support.fakeapi import MODEL, Api, StartFake, jsonl


def sdk_requests(
    prefix: str, count: int
) -> list[anthropic.types.messages.batch_create_params.Request]:
    return [
        {
            "custom_id": f"{prefix}-{n}",
            "params": {
                "model": MODEL,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": f"Tell me about {prefix} {n}"}],
            },
        }
        for n in range(count)
    ]


async def test_sdk_create_retrieve_list_results_cancel_delete(fake: FakeApiServer) -> None:
    async with anthropic.AsyncAnthropic(api_key="test", base_url=fake.base_url) as client:
        batches = client.messages.batches
        created = [await batches.create(requests=sdk_requests(f"b{n}", 3)) for n in range(5)]
        assert all(isinstance(batch, MessageBatch) for batch in created)
        assert created[0].processing_status == "in_progress"
        assert created[0].request_counts.processing == 3
        assert created[0].results_url is None

        listed = [batch.id async for batch in batches.list(limit=2)]
        assert listed == [batch.id for batch in reversed(created)]  # 3 pages, newest first
        page = await batches.list(limit=2)
        assert page.has_more is True
        assert len(page.data) == 2

        fake.clock.advance(1.0)
        ended = await batches.retrieve(created[0].id)
        assert isinstance(ended, MessageBatch)
        assert ended.processing_status == "ended"
        assert ended.ended_at is not None
        assert ended.request_counts.succeeded == 3
        results = [result async for result in await batches.results(created[0].id)]
        assert sorted(result.custom_id for result in results) == ["b0-0", "b0-1", "b0-2"]
        for result in results:
            assert result.result.type == "succeeded"
            assert isinstance(result.result, MessageBatchSucceededResult)
            n = result.custom_id.removeprefix("b0-")
            block = result.result.message.content[0]
            assert isinstance(block, TextBlock)
            assert f"Tell me about b0 {n}" in block.text
            assert result.result.message.usage.service_tier == "batch"

        deleted = await batches.delete(created[0].id)
        assert isinstance(deleted, DeletedMessageBatch)
        assert deleted.id == created[0].id
        assert deleted.type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            await batches.retrieve(created[0].id)

        fresh = await batches.create(requests=sdk_requests("late", 2))
        canceling = await batches.cancel(fresh.id)
        assert canceling.processing_status == "canceling"
        assert canceling.cancel_initiated_at is not None
        fake.clock.advance(1.0)
        canceled = await batches.retrieve(fresh.id)
        assert canceled.processing_status == "ended"
        with pytest.raises(anthropic.BadRequestError):
            await batches.cancel(fresh.id)


async def test_sdk_reads_errored_results_and_typed_errors(fake: FakeApiServer) -> None:
    async with anthropic.AsyncAnthropic(
        api_key="test", base_url=fake.base_url, max_retries=0
    ) as client:
        batch = await client.messages.batches.create(
            requests=[
                {
                    "custom_id": "bad",
                    "params": {"model": MODEL, "max_tokens": 0, "messages": []},
                }
            ]
        )
        fake.clock.advance(1.0)
        [line] = [result async for result in await client.messages.batches.results(batch.id)]
        assert isinstance(line.result, MessageBatchErroredResult)
        assert line.result.error.error.type == "invalid_request_error"
        assert line.result.error.error.message == "max_tokens: must be greater than or equal to 1"

        fake.faults.config = FaultConfig(
            http_fault_rate=1.0, http_fault_kinds=("429",), retry_after_seconds=3
        )
        with pytest.raises(anthropic.RateLimitError) as raised:
            await client.messages.batches.list()
        assert raised.value.response.headers["retry-after"] == "3"
        assert raised.value.request_id is not None
        assert raised.value.request_id.startswith("req_")
        fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("529",))
        with pytest.raises(anthropic.InternalServerError):
            await client.messages.batches.list()
        fake.faults.config = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("drop",))
        with pytest.raises(anthropic.APIConnectionError):
            await client.messages.batches.list()


async def test_sdk_with_a_wrong_key_gets_authentication_error(start_fake: StartFake) -> None:
    locked = await start_fake(api_key="sk-right")
    async with anthropic.AsyncAnthropic(api_key="sk-wrong", base_url=locked.base_url) as client:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            await client.messages.batches.list()
    assert raised.value.status_code == 401
    assert raised.value.type == "authentication_error"
    assert raised.value.api_message == "invalid x-api-key"


async def test_the_guides_curl_calls_work_unchanged_but_the_host(
    api: Api, fake: FakeApiServer
) -> None:
    """The requests of batch-processing-guide.md: same headers, same bodies."""
    curl_headers = {"x-api-key": "sk-ant-anything", "anthropic-version": "2023-06-01"}
    body = (
        b'{\n    "requests": [\n'
        b'      {"custom_id": "task-1", "params": {"model": "claude-haiku-4-5-20250514", '
        b'"max_tokens": 100, "messages": [{"role": "user", "content": "Hello, world!"}]}},\n'
        b'      {"custom_id": "task-2", "params": {"model": "claude-haiku-4-5-20250514", '
        b'"max_tokens": 100, "messages": [{"role": "user", "content": "What is 2+2?"}]}}\n'
        b"    ]\n  }"
    )
    url = fake.base_url + "/v1/messages/batches"
    async with api.http.post(
        url, data=body, headers={**curl_headers, "content-type": "application/json"}
    ) as response:
        assert response.status == 200
        batch_id = (await response.json())["id"]
    fake.clock.advance(1.0)
    async with api.http.get(f"{url}/{batch_id}", headers=curl_headers) as response:
        status = await response.json()
    assert status["processing_status"] == "ended"
    assert status["request_counts"]["succeeded"] == 2
    async with api.http.get(f"{url}/{batch_id}/results", headers=curl_headers) as response:
        lines = jsonl(await response.read())
    texts = {line["custom_id"]: line["result"]["message"]["content"][0]["text"] for line in lines}
    assert "Hello, world!" in texts["task-1"]
    assert "What is 2+2?" in texts["task-2"]
    async with api.http.get(url, headers=curl_headers) as response:
        assert [b["id"] for b in (await response.json())["data"]] == [batch_id]
    async with api.http.post(f"{url}/{batch_id}/cancel", headers=curl_headers) as response:
        assert response.status == 400  # ended already; a fresh batch would be canceling
