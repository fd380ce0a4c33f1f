"""2xx answers that are not the object the spec promises (§1.1, §2) never reach the store:
the client makes them a retried transport error, and for a create an unknown outcome.
Redirects are never followed: aiohttp would send our x-api-key to any host."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aioresponses import aioresponses

from batchd.api import (
    ApiConnectionError,
    ApiStatusError,
    BytesBody,
    CreateOutcomeUnknown,
    RetryPolicy,
)
from batchd.api.shapes import MalformedResponse, message_batch, message_batch_list
from batchd.config import Config
from batchd.service.daemon import run_daemon
from batchd.store import Store
from tests.support.client import BATCHES, Serve, Sleeps, batch_json
from tests.support.params import request_params


def broken(**changes: Any) -> dict[str, Any]:
    batch = batch_json("msgbatch_x")
    for key, value in changes.items():
        if value is ...:
            del batch[key]
        else:
            batch[key] = value
    return batch


MALFORMED: dict[str, Any] = {
    "empty object": {},
    "array": [],
    "null": None,
    "no request_counts": broken(request_counts=...),
    "request_counts null": broken(request_counts=None),
    "a count as text": broken(request_counts={**batch_json()["request_counts"], "errored": "1"}),
    "a count as bool": broken(request_counts={**batch_json()["request_counts"], "expired": True}),
    "unknown status": broken(processing_status="queued"),
    "no id": broken(id=...),
    "ended_at not a date": broken(ended_at="yesterday"),
    "created_at without zone": broken(created_at="2025-01-29T14:25:40"),
    "results_url a number": broken(results_url=5),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=list(MALFORMED))
def test_a_malformed_batch_is_refused_naming_the_problem(body: Any) -> None:
    with pytest.raises(MalformedResponse):
        message_batch(body)


def test_well_formed_batches_and_pages_pass_unchanged() -> None:
    ended = {**batch_json("b", "ended"), "ended_at": "2025-01-30T00:00:00Z", "extra": 1}
    assert message_batch(ended) is ended
    page = {"data": [ended], "has_more": False, "first_id": "b", "last_id": "b"}
    assert message_batch_list(page) is page
    with pytest.raises(MalformedResponse):
        message_batch_list({**page, "data": [ended, {}]})


async def test_a_malformed_retrieve_is_retried_then_a_connection_error(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    mocked.get(f"{BATCHES}/b", payload=broken(request_counts=None), repeat=True)
    with pytest.raises(ApiConnectionError, match=r"malformed body: .*request_counts"):
        await make_client(policy=RetryPolicy(max_retries=2)).retrieve("b")
    assert len(sleeps) == 2


async def test_a_malformed_create_answer_is_an_unknown_outcome(
    mocked: aioresponses, make_client: Any
) -> None:
    mocked.post(BATCHES, payload={})  # it may well have created the batch
    with pytest.raises(CreateOutcomeUnknown):
        await make_client().create(BytesBody(b'{"requests":[]}'))


async def test_redirects_are_not_followed_so_the_key_stays_home(
    serve: Serve, make_client: Any
) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("x-api-key"))
        return web.json_response(batch_json("b"))

    other = web.Application()
    other.router.add_get("/stolen", elsewhere)
    other_url = await serve(other)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{other_url}/stolen")

    api = web.Application()
    api.router.add_get("/v1/messages/batches/b", redirect)
    api.router.add_get("/results/b", redirect)
    api_url = await serve(api)
    client = make_client(api_url, policy=RetryPolicy(max_retries=0))
    with pytest.raises(ApiStatusError, match="302"):
        await client.retrieve("b")
    with pytest.raises(ApiStatusError, match="302"):
        async with client.results(f"{api_url}/results/b", batch_id="b"):
            pass
    assert seen == []  # the other host never saw a request, let alone our key


async def test_the_daemon_outlives_malformed_answers_and_finishes_once_they_heal(
    store: Store, serve: Serve, daemon_config: Callable[..., Config]
) -> None:
    await store.enqueue([("a", request_params("a"))])
    await store.close()
    answers = {"retrieve": 0}
    created = {**batch_json("msgbatch_a"), "created_at": "2026-11-24T15:40:37Z"}

    async def create(request: web.Request) -> web.Response:
        return web.json_response(created)

    async def retrieve(request: web.Request) -> web.Response:
        answers["retrieve"] += 1
        if answers["retrieve"] <= 3:  # three polls answered with the wrong shape
            return web.json_response(broken(request_counts=None))
        ended = {
            **created,
            "processing_status": "ended",
            "ended_at": "2026-11-24T15:41:00Z",
            "request_counts": {**created["request_counts"], "processing": 0, "succeeded": 1},
            "results_url": f"{request.url.origin()!s}/results",
        }
        return web.json_response(ended)

    async def results(request: web.Request) -> web.Response:
        line = {
            "custom_id": "a",
            "result": {"type": "succeeded", "message": {"model": "m", "content": []}},
        }
        return web.json_response(line)

    app = web.Application()
    app.router.add_post("/v1/messages/batches", create)
    app.router.add_get("/v1/messages/batches/msgbatch_a", retrieve)
    app.router.add_get("/results", results)
    base_url = await serve(app)
    config = daemon_config(base_url)
    config = replace(config, api=replace(config.api, max_retries=0))
    code = await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30)
    assert code == 0
    assert answers["retrieve"] >= 4
