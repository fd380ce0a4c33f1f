"""A second client on the same API key: another tool creating batches beside batchd.

    batches = await create_foreign_batches(fake.base_url, [4, 4, 4], at=[0.0, 0.8, 1.6])

Plain aiohttp, one attempt per batch and no retries: what reached the fake is exactly
what the test asked for, and a create that failed (an injected fault hits this client
too: the fake cannot tell keys apart) is reported, never sent again. Run it as a task
beside the daemon to have batches appear while batchd creates and reconciles.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from batchd.api.wire import ANTHROPIC_VERSION, BATCHES_PATH

FOREIGN_API_KEY = "sk-foreign-tool"
FOREIGN_MODEL = "claude-haiku-4-5-20251001"


def foreign_custom_id(batch: int, request: int) -> str:
    """Ids no batchd test task uses; pass your own to make another tool's ids collide."""
    return f"foreign-{batch}-{request}"


@dataclass(frozen=True)
class ForeignBatch:
    """One create by the second client: the batch, or why there is none (as far as it knows)."""

    custom_ids: tuple[str, ...]
    sent_after: float  # seconds after the call began, when the POST went out
    batch_id: str | None  # None: no answer with a batch (a fault, a dropped connection)
    created_at: str | None
    failure: str | None  # "HTTP 429", "ClientConnectionError: ...", None on success

    @property
    def request_count(self) -> int:
        return len(self.custom_ids)


async def create_foreign_batches(
    base_url: str,
    counts: Sequence[int],
    *,
    at: Sequence[float] | None = None,
    api_key: str = FOREIGN_API_KEY,
    custom_id: Callable[[int, int], str] = foreign_custom_id,
    timeout_s: float = 30.0,
) -> list[ForeignBatch]:
    """Create one batch of `counts[i]` requests at `at[i]` seconds from now (default: all
    at once), concurrently, so a slow create does not delay the next. Returns them in the
    order of `counts`; the ids of batch i are `custom_id(i, 0..counts[i]-1)`."""
    times = list(at) if at is not None else [0.0] * len(counts)
    if len(times) != len(counts):
        raise ValueError(f"{len(counts)} counts but {len(times)} times")
    headers = {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION}
    loop = asyncio.get_running_loop()
    began = loop.time()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:

        async def one(index: int, count: int, delay: float) -> ForeignBatch:
            ids = tuple(custom_id(index, n) for n in range(count))
            await asyncio.sleep(max(0.0, began + delay - loop.time()))
            sent_after = loop.time() - began
            try:
                return await _post(session, base_url, ids, sent_after)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
                return ForeignBatch(ids, sent_after, None, None, failure)

        return list(
            await asyncio.gather(
                *(
                    one(i, count, delay)
                    for i, (count, delay) in enumerate(zip(counts, times, strict=True))
                )
            )
        )


async def _post(
    session: aiohttp.ClientSession, base_url: str, ids: tuple[str, ...], sent_after: float
) -> ForeignBatch:
    body = {
        "requests": [
            {
                "custom_id": one_id,
                "params": {
                    "model": FOREIGN_MODEL,
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"another tool asks {one_id}"}],
                },
            }
            for one_id in ids
        ]
    }
    async with session.post(
        base_url + BATCHES_PATH,
        data=io.BytesIO(orjson.dumps(body)),
        headers={"content-type": "application/json"},
    ) as response:
        payload = await response.read()
        if response.status != 200:
            return ForeignBatch(ids, sent_after, None, None, f"HTTP {response.status}")
    batch = orjson.loads(payload)
    return ForeignBatch(ids, sent_after, str(batch["id"]), str(batch["created_at"]), None)
