"""A full-size batch: 100,000 requests accepted and streamed back complete (§5)."""

from __future__ import annotations

import io
import time

import aiohttp
import orjson

from batchd.api.wire import BATCHES_PATH, MAX_REQUESTS_PER_BATCH
from batchd.fakeapi.server import FakeApiServer
from tests.support.fakeapi import params


async def test_100k_requests_are_accepted_and_stream_back_complete(
    fake: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    # The fake runs in this process: its CPU time is the cost of accepting and streaming a
    # full batch, whatever else the machine runs. Wall time was that cost times the load
    # (2.2-2.5 s of CPU took 5-12.8 s with one CPU-bound process beside it on 2 cores).
    started = time.process_time()
    body = orjson.dumps(
        {
            "requests": [
                {"custom_id": f"t{n}", "params": params(f"q{n}", max_tokens=8)}
                for n in range(MAX_REQUESTS_PER_BATCH)
            ]
        }
    )
    url = fake.base_url + BATCHES_PATH
    async with http.post(
        url, data=io.BytesIO(body), headers={"content-type": "application/json"}
    ) as response:
        assert response.status == 200, await response.text()
        batch = await response.json()
    assert batch["request_counts"]["processing"] == MAX_REQUESTS_PER_BATCH
    fake.clock.advance(1.0)

    seen = 0
    pieces = 0
    tail = b""
    async with http.get(f"{url}/{batch['id']}/results") as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(1 << 20):
            pieces += 1
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                result = orjson.loads(line)
                n = result["custom_id"][1:]
                assert f"q{n}" in result["result"]["message"]["content"][0]["text"]
                seen += 1
    assert tail == b""
    assert seen == MAX_REQUESTS_PER_BATCH
    assert pieces > 1  # streamed, not one write
    cpu_s = time.process_time() - started
    print(f"\n100k requests accepted and streamed back: {cpu_s:.2f} s of CPU")
    assert cpu_s < 10
    async with http.get(f"{fake.base_url}/_fake/stats") as response:
        stats = await response.json()
    counts = stats["submission_counts"]  # a count per custom_id, never the requests
    assert len(counts) == MAX_REQUESTS_PER_BATCH
    assert set(counts.values()) == {1}
    assert stats["submissions_by_custom_id"] == {}
