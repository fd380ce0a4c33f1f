"""The web view at / on the daemon's local listener: served from the package, read-only,
its JSON the very document `batchd status --json` prints, and in a real browser (Debian's
Chromium, headless) the numbers it shows are the database's as they change."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.config import Config, load_config
from batchd.domain import IN_FLIGHT_BATCH_STATES, TaskStatus
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.service.health import Health
from batchd.service.metrics import Registry
from batchd.service.status import expires_in_s, status_snapshot
from batchd.service.web.server import STATUS_MAX_AGE_S, MetricsServer
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.browser import Page, chromium_page
from tests.support.params import request_params

# --- the listener's routes -------------------------------------------------------------


async def healthy() -> Health:
    return Health()


async def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url) as response:
        return response.status, dict(response.headers), await response.read()


async def test_without_a_status_source_the_listener_has_no_web_view() -> None:
    async with MetricsServer(Registry(), healthy) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert (await fetch(f"{base}/"))[0] == 404
        assert (await fetch(f"{base}/api/status"))[0] == 404
        assert (await fetch(f"{base}/healthz"))[0] == 200


async def test_page_and_assets_come_from_the_package_read_only_with_a_strict_policy() -> None:
    document = {"tasks": {"pending": 3}, "generated_at": "2026-12-07T01:00:00+00:00"}

    async def status() -> dict[str, Any]:
        return document

    async with MetricsServer(Registry(), healthy, status=status) as server:
        base = f"http://127.0.0.1:{server.port}"
        code, headers, page = await fetch(f"{base}/")
        assert code == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "connect-src 'self'" in policy
        assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
        assert sorted(assets) == [b"/static/app.js", b"/static/style.css"]
        for asset, content_type in [("app.js", "text/javascript"), ("style.css", "text/css")]:
            code, headers, body = await fetch(f"{base}/static/{asset}")
            assert (code, headers["Content-Type"]) == (200, f"{content_type}; charset=utf-8")
            # Offline: nothing in the page's files points at another host (the SVG
            # namespace is a name, never fetched).
            text = body.replace(b"http://www.w3.org/2000/svg", b"")
            assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), asset
        code, headers, body = await fetch(f"{base}/api/status")
        assert (code, headers["Content-Type"]) == (200, "application/json")
        assert orjson.loads(body) == document
        for route in ("/", "/api/status", "/metrics"):
            assert (await fetch(f"{base}{route}", "POST"))[0] == 405  # read-only


async def test_tabs_asking_at_once_share_one_read_of_the_database() -> None:
    reads = 0

    async def status() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)  # a read in progress while the other tabs ask
        return {"read": reads}

    async with MetricsServer(Registry(), healthy, status=status) as server:
        url = f"http://127.0.0.1:{server.port}/api/status"
        answers = await asyncio.gather(*(fetch(url) for _ in range(5)))
        assert {orjson.loads(body)["read"] for _, _, body in answers} == {1}
        assert reads == 1
        await asyncio.sleep(STATUS_MAX_AGE_S)
        _, _, body = await fetch(url)
        assert orjson.loads(body) == {"read": 2}  # older than a second: read again


# --- against a daemon working on the fake API ---------------------------------------------


@dataclass
class Running:
    daemon: Daemon
    base_url: str
    config: Config


@pytest.fixture
async def held_fake_api() -> AsyncIterator[FakeApiServer]:
    """Batches stay in progress until the test moves the fake's clock on."""
    async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=600, seed=3)) as server:
        yield server


@pytest.fixture
def config_file(tmp_path: Path, held_fake_api: FakeApiServer) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(
        f'[database]\npath = "{tmp_path / "web.db"}"\n'
        f'[api]\nbase_url = "{held_fake_api.base_url}"\n'
        "[batching]\nlinger_seconds = 0.05\n"
        "[polling]\ninterval_seconds = 0.1\n"
        "[metrics]\nenabled = true\nport = 0\n"
        '[budget]\nmax_spend_usd = 0.05\nperiod = "total"\n'
    )
    return path


@pytest.fixture
async def store(config_file: Path) -> AsyncIterator[Store]:
    opened = await SqliteStore.open(load_config(config_file, {}).database.path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def running(config_file: Path, store: Store) -> AsyncIterator[Running]:
    config = load_config(config_file, {})
    started: asyncio.Queue[Daemon] = asyncio.Queue()

    async def keep(daemon: Daemon) -> None:
        await started.put(daemon)

    task = asyncio.create_task(run_daemon(config, "k", on_started=keep))
    daemon = await asyncio.wait_for(started.get(), 30)
    try:
        yield Running(daemon, f"http://127.0.0.1:{daemon.metrics_port}", config)
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 30) == 0


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def enqueue_work(store: Store) -> None:
    await store.enqueue((f"web-{i}", request_params(f"web view {i}")) for i in range(12))
    # Refused before it is sent (max_tokens below 1): it ends invalid, with its reason.
    await store.enqueue([("web-bad", request_params("refused", max_tokens=0))])


async def test_api_status_is_the_document_batchd_status_json_prints(
    running: Running, store: Store, held_fake_api: FakeApiServer, config_file: Path
) -> None:
    await enqueue_work(store)
    await until(lambda: _batches_in_progress(store, 1), "a batch in progress")
    held_fake_api.clock.advance(601)
    await until(lambda: _all_done(store), "every task done")
    _, _, body = await fetch(f"{running.base_url}/api/status")
    served = orjson.loads(body)
    printed = subprocess.run(
        [sys.executable, "-m", "batchd", "--config", str(config_file), "status", "--json"],
        capture_output=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))},
    )
    from_cli = orjson.loads(printed.stdout)
    assert served.pop("generated_at")
    assert from_cli.pop("generated_at")
    assert served == from_cli
    assert set(served) >= {"tasks", "batches_in_flight", "budget", "throughput", "latest_errors"}
    assert served["tasks"]["succeeded"] == 12


# --- in a real browser ----------------------------------------------------------------------

SHOWN = """(() => {
  if (!document.getElementById("state")) return null;  // still loading
  const count = (status) => Number(document.querySelector(
    `#tasks tr[data-status="${status}"] .count`).textContent.replaceAll(",", ""));
  const statuses = ["pending", "submitted", "succeeded", "errored", "expired", "canceled",
                    "invalid"];
  return {
    state: document.getElementById("state").dataset.state || "",
    tasks: Object.fromEntries(statuses.map((s) => [s, count(s)])),
    batches: [...document.querySelectorAll("#batch-rows tr[data-batch]")].map((row) => ({
      id: row.dataset.batch, expires_in_s: Number(row.dataset.expiresInS),
      text: row.innerText })),
    throughput: Number(document.getElementById("chart").dataset.total),
    bars: document.querySelectorAll("#chart rect").length,
    errors: [...document.querySelectorAll("#error-rows tr[data-custom-id]")].map((row) => ({
      custom_id: row.dataset.customId, error: row.cells[3].textContent })),
    spent_usd: Number(document.getElementById("spent").dataset.usd),
    spent_text: document.getElementById("budget").innerText,
  };
})()"""


async def shown(page: Page) -> dict[str, Any]:
    value: dict[str, Any] | None = await page.evaluate(SHOWN)
    return value or {"state": "loading"}


async def database_view(store: Store, config: Config) -> dict[str, Any]:
    counts = await store.status_counts()
    batches = await store.batches_in(*IN_FLIGHT_BATCH_STATES)
    snapshot = await status_snapshot(store, config)
    return {
        "tasks": {str(status): counts[status] for status in TaskStatus},
        "batch_ids": [batch.api_batch_id for batch in batches],
        "expires_in_s": [expires_in_s(batch, datetime.now(UTC)) for batch in batches],
        "throughput": sum(snapshot["throughput"]["succeeded"] + snapshot["throughput"]["failed"]),
        "errors": [(e["custom_id"], e["error"]) for e in snapshot["latest_errors"]],
        "spent_usd": snapshot["budget"]["spent_usd"],
    }


def agrees(page: dict[str, Any], database: dict[str, Any]) -> bool:
    return (
        page["state"] == "live"
        and page["tasks"] == database["tasks"]
        and [b["id"] for b in page["batches"]] == database["batch_ids"]
        and page["throughput"] == database["throughput"]
        and [(e["custom_id"], e["error"]) for e in page["errors"]] == database["errors"]
        and round(page["spent_usd"], 6) == database["spent_usd"]
    )


async def page_agrees(page: Page, store: Store, config: Config, what: str) -> dict[str, Any]:
    """Wait until what the page shows is what the database says (the page lags a refresh)."""
    last: list[tuple[dict[str, Any], dict[str, Any]]] = []

    async def check() -> bool:
        pair = (await shown(page), await database_view(store, config))
        last[:] = [pair]
        return agrees(*pair)

    try:
        await until(check, what, timeout_s=15)
    except AssertionError:
        raise AssertionError(f"{what}: page {last[0][0]} vs database {last[0][1]}") from None
    return last[0][0]


async def test_the_page_shows_what_the_database_says_as_it_changes(
    running: Running,
    store: Store,
    held_fake_api: FakeApiServer,
    tmp_path: Path,
) -> None:
    url = f"{running.base_url}/?refresh_ms=250"
    async with chromium_page(url, tmp_path / "chromium-profile") as page:
        # 1. Nothing yet.
        first = await page_agrees(page, store, running.config, "an empty database")
        assert sum(first["tasks"].values()) == 0
        assert first["batches"] == []

        # 2. Twelve tasks go out in one batch, held in progress by the fake; batchd refuses
        #    the thirteenth before sending it, and says why among the errors.
        await enqueue_work(store)
        await until(lambda: _batches_in_progress(store, 1), "a batch in progress")
        flying = await page_agrees(page, store, running.config, "a batch in flight")
        assert (flying["tasks"]["submitted"], flying["tasks"]["invalid"]) == (12, 1)
        [batch] = flying["batches"]
        [expected] = (await database_view(store, running.config))["expires_in_s"]
        assert abs(batch["expires_in_s"] - expected) < 10  # about 24 h to go
        assert "in_progress" in batch["text"]
        assert "24.0 h" in batch["text"] or "23.9 h" in batch["text"]

        # 3. The batch ends: its results are written.
        held_fake_api.clock.advance(601)
        await until(lambda: _all_done(store), "every task done")
        done = await page_agrees(page, store, running.config, "results stored")
        assert (done["tasks"]["succeeded"], done["tasks"]["invalid"]) == (12, 1)
        assert done["batches"] == []
        assert done["throughput"] == 12
        assert done["bars"] >= 1  # the minute's bar is drawn
        [error] = done["errors"]
        assert error["custom_id"] == "web-bad"
        assert "max_tokens" in error["error"]
        assert done["spent_usd"] > 0
        assert "of $0.0500 in total" in done["spent_text"]

        screenshot = await _screenshot(page, tmp_path / "web-view.png")
        assert screenshot.stat().st_size > 10_000
        if target := os.environ.get("BATCHD_WEB_SCREENSHOT"):
            shutil.copyfile(screenshot, target)  # how docs/web-view.png is made

        # Offline and self-contained: every request went to the daemon's own listener, and
        # the page logged no error (a blocked resource or a script fault would).
        requested = [
            e["params"]["request"]["url"]
            for e in page.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        assert requested
        assert all(u.startswith(running.base_url) for u in requested), requested
        problems = [
            e
            for e in page.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        ]
        assert problems == []


async def _screenshot(page: Page, path: Path) -> Path:
    height = await page.evaluate("document.documentElement.scrollHeight")
    await page.send(
        "Emulation.setDeviceMetricsOverride",
        width=1280,
        height=int(height),
        deviceScaleFactor=1,
        mobile=False,
    )
    shot = await page.send("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


async def _batches_in_progress(store: Store, count: int) -> bool:
    # In progress, not merely in flight: a batch still `creating` does not exist at the
    # fake yet, and moving the fake's clock before it does would not end it.
    return len(await store.batches_in("in_progress")) == count


async def _all_done(store: Store) -> bool:
    counts = await store.status_counts()
    if counts[TaskStatus.PENDING] or counts[TaskStatus.SUBMITTED]:
        return False
    return not await store.batches_in("creating", "in_progress", "canceling", "ended")
