"""Test-only control endpoints under /_fake/ (no auth; never part of the real API).

GET  /_fake/stats            counters: creates, batches, requests, late creates
                             not committed yet, submissions by custom_id (those
                             sent more than once, and every one), faults injected
GET  /_fake/faults           the current fault configuration
POST /_fake/faults {...}     replace it (FaultConfig field names; omitted = default)
POST /_fake/down {"seconds": N, "mode": "503"|"drop"}
                             every API endpoint fails until the fake's now + N
POST /_fake/advance {"seconds": N}
                             move the fake's clock forward (real time + offset)
"""

from __future__ import annotations

import orjson
from aiohttp import web

from batchd.api.wire import format_timestamp
from batchd.fakeapi.app import FAKE_API, error_response, json_response
from batchd.fakeapi.faults import FaultConfig

PREFIX = "/_fake"


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get(f"{PREFIX}/stats", stats, name="fake_stats")
    app.router.add_get(f"{PREFIX}/faults", get_faults, name="fake_get_faults")
    app.router.add_post(f"{PREFIX}/faults", set_faults, name="fake_set_faults")
    app.router.add_post(f"{PREFIX}/down", go_down, name="fake_down")
    app.router.add_post(f"{PREFIX}/advance", advance, name="fake_advance")


class BadControlRequest(Exception):
    pass


async def _json_object(request: web.Request) -> dict[str, object]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadControlRequest(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadControlRequest("expected a JSON object")
    return body


def _seconds(body: dict[str, object]) -> float:
    seconds = body.get("seconds")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise BadControlRequest('"seconds" must be a number >= 0')
    return float(seconds)


def _bad(request: web.Request, exc: Exception) -> web.Response:
    return error_response(request, 400, "invalid_request_error", str(exc))


async def stats(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    payload = api.state.stats_json()
    payload["creates_pending"] = len(api.pending_creates)
    payload["faults_injected"] = dict(api.faults.injected)
    payload["now"] = format_timestamp(api.clock())
    return json_response(request, payload)


async def get_faults(request: web.Request) -> web.StreamResponse:
    return json_response(request, request.app[FAKE_API].faults.config.to_json())


async def set_faults(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    try:
        api.faults.config = FaultConfig.from_json(await _json_object(request))
    except (BadControlRequest, ValueError, TypeError) as exc:
        return _bad(request, exc)
    return json_response(request, api.faults.config.to_json())


async def go_down(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    try:
        body = await _json_object(request)
        seconds = _seconds(body)
    except BadControlRequest as exc:
        return _bad(request, exc)
    mode = body.get("mode", "503")
    if mode not in ("503", "drop"):
        return _bad(request, BadControlRequest('"mode" must be "503" or "drop"'))
    api.faults.go_down(api.clock(), seconds, "drop" if mode == "drop" else "503")
    assert api.faults.down_until is not None
    return json_response(request, {"down_until": format_timestamp(api.faults.down_until)})


async def advance(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    try:
        seconds = _seconds(await _json_object(request))
    except BadControlRequest as exc:
        return _bad(request, exc)
    api.clock.advance(seconds)
    api.persist()
    return json_response(request, {"now": format_timestamp(api.clock())})
