"""batchd as a systemd service: sd_notify from the real daemon process, metrics, health."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp

from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from tests.support.params import request_params
from tests.support.waiting import eventually


async def receive_until(
    sock: socket.socket, wanted: Callable[[list[str]], bool], timeout_s: float
) -> list[str]:
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def collect() -> None:
        while not wanted(messages):
            messages.append((await loop.sock_recv(sock, 4096)).decode())

    await asyncio.wait_for(collect(), timeout_s)
    return messages


async def test_the_daemon_process_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, fake_api: FakeApiServer, store: Store
) -> None:
    await store.enqueue((f"n-{i}", request_params(f"notify {i}")) for i in range(5))
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    config = tmp_path / "batchd.toml"
    config.write_text(
        f'[database]\npath = "{tmp_path / "batchd.db"}"\n'
        "[batching]\nlinger_seconds = 0.05\n[polling]\ninterval_seconds = 0.1\n"
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "400000",
        "ANTHROPIC_BASE_URL": fake_api.base_url,
        "ANTHROPIC_API_KEY": "k",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "--config",
        str(config),
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        messages = await receive_until(
            sock, lambda got: sum("WATCHDOG=1" in m for m in got) >= 3, timeout_s=20
        )
        assert messages[0] == "READY=1"  # before anything else: the database is open
        statuses = [m for m in messages if m.startswith("STATUS=")]
        assert statuses
        assert re.match(r"STATUS=[\d,]+ pending, \d+ batches in flight, [\d,]+ done", statuses[0])
        process.send_signal(signal.SIGTERM)
        rest = await receive_until(sock, lambda got: "STOPPING=1" in got, timeout_s=20)
        assert "STOPPING=1" in rest
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        await process.stderr.read()
        sock.close()


async def test_metrics_and_health_report_what_the_database_says(
    fake_api: FakeApiServer, daemon_config: Callable[..., Config], store: Store
) -> None:
    await store.enqueue((f"m-{i}", request_params(f"metric {i}")) for i in range(20))
    config = daemon_config(fake_api.base_url)
    config = replace(config, metrics=replace(config.metrics, enabled=True, port=0))
    started: list[Daemon] = []

    async def keep(daemon: Daemon) -> None:
        started.append(daemon)

    running = asyncio.create_task(run_daemon(config, "k", on_started=keep))
    try:
        await eventually(
            store.status_counts, "20 tasks succeeded", 30, until=lambda c: c["succeeded"] == 20
        )
        port = started[0].metrics_port
        assert port
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                health = await response.text()
    finally:
        if started:
            started[0].stop()
        assert await running == 0
    # Healthy, and the key's state said too (issue 14: /healthz reports the key's state).
    assert re.fullmatch(r"ok\napi key: ok \(from [^)]+\)\n", health), health
    assert 'batchd_tasks{status="succeeded"} 20' in text
    assert 'batchd_tasks{status="pending"} 0' in text
    assert "batchd_batches_created_total 1" in text
    assert "batchd_requests_submitted_total 20" in text
    assert re.search(r'batchd_api_requests_total\{endpoint="create",status="200"\} 1', text)
    assert re.search(r'batchd_results_written_total\{outcome="written"\} 20', text)
    input_tokens = re.search(r'batchd_tokens_total\{kind="input"\} (\d+)', text)
    assert input_tokens
    assert int(input_tokens.group(1)) > 0  # from the usage ledger, as the database says
    # Issue 14's gauges, from the real daemon: all done, so nothing waits or flies.
    assert "batchd_oldest_pending_task_age_seconds 0.0\n" in text
    assert "batchd_oldest_in_flight_batch_age_seconds 0.0\n" in text
    assert (
        "# TYPE batchd_next_batch_expiry_seconds gauge\nbatchd_next_batch_expiry_seconds"
        not in (text)
    )
    assert "batchd_budget_paused 0.0\n" in text
    assert re.search(r"\nbatchd_budget_period_spent_usd \d", text)
    polled = re.search(r"\nbatchd_last_successful_poll_timestamp_seconds ([0-9.e+]+)\n", text)
    assert polled
    assert abs(float(polled.group(1)) - time.time()) < 60


async def test_health_names_missing_loops_without_blaming_the_database(
    fake_api: FakeApiServer, daemon_config: Callable[..., Config], store: Store
) -> None:
    await store.close()
    seen: list[tuple[str, ...]] = []

    async def before_the_loops_start(daemon: Daemon) -> None:
        seen.append((await daemon.health()).reasons)
        daemon.stop()

    config = daemon_config(fake_api.base_url)
    assert await run_daemon(config, "k", on_started=before_the_loops_start) == 0
    [reasons] = seen
    assert reasons[0].startswith("loops not running: ")
    assert "database not answering" not in reasons
