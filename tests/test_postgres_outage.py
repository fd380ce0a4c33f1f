"""PostgreSQL restarted under a running daemon: it waits with backoff, says so in its logs,
/healthz and systemd STATUS, resumes, and no task fails for it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from batchd.config import Config, DatabaseConfig
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.service.logs import configure_logging
from batchd.store import StoreError, open_store
from tests.support.params import request_params
from tests.support.pgcluster import PrivateCluster

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store_backend", ["postgresql"],
                                                             indirect=True)]  # fmt: skip
TASKS = 200


@pytest.fixture(scope="session")
def postgres_dsn(private_postgres_dsn: str) -> str:
    """This module's store on a cluster of the session's own, which the test restarts:
    restarting the shared one broke every other test using it (tests/support/pgcluster.py)."""
    return private_postgres_dsn


async def _succeeded(database: DatabaseConfig) -> int:
    try:
        store = await open_store(database, migrate=False)
    except StoreError:
        return -1  # still restarting
    try:
        return (await store.status_counts())["succeeded"]
    except StoreError:
        return -1
    finally:
        await store.close()


async def test_a_server_restart_is_waited_out_and_no_task_fails(
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    database_config: DatabaseConfig,
    private_postgres: PrivateCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    store = await open_store(database_config)
    await store.enqueue((f"o-{n}", request_params(f"outage {n}")) for n in range(TASKS))
    await store.close()
    status_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    status_socket.bind(str(tmp_path / "notify.sock"))
    status_socket.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    started: list[Daemon] = []

    async def keep(daemon: Daemon) -> None:
        started.append(daemon)

    config = daemon_config(fake_api.base_url, max_requests=10)
    configure_logging("console", "info")  # the outage's events are info and warning
    request.addfinalizer(lambda: configure_logging("console", "warning"))
    health_seen: list[str] = []
    with capture_logs() as events:
        running = asyncio.create_task(run_daemon(config, "test-key", on_started=keep))
        async with asyncio.timeout(90):
            while await _succeeded(database_config) < 20:
                await asyncio.sleep(0.1)
            restart = await asyncio.create_subprocess_exec(
                *private_postgres.restart_command, stdout=asyncio.subprocess.DEVNULL
            )
            restarting = asyncio.ensure_future(restart.wait())
            try:
                while not restarting.done():
                    health = await started[0].health()
                    health_seen += [r for r in health.reasons if "unavailable" in r]
                    await asyncio.sleep(0.05)
            finally:
                assert await asyncio.wait_for(restarting, 60) == 0
            while await _succeeded(database_config) < TASKS:
                await asyncio.sleep(0.2)
        started[0].stop()
        assert await running == 0
    datagrams = []
    with contextlib.suppress(BlockingIOError):
        while True:
            datagrams.append(status_socket.recv(4096).decode())
    status_socket.close()

    store = await open_store(database_config)
    try:
        counts = await store.status_counts()
    finally:
        await store.close()
    assert counts["succeeded"] == TASKS
    assert sum(counts.values()) == TASKS  # none failed, none invalid
    names = [event["event"] for event in events]
    assert "database_unavailable" in names
    assert "database_available_again" in names
    assert "loop_crashed" not in names
    unavailable = next(e for e in events if e["event"] == "database_unavailable")
    assert "***" in unavailable["error"] or "postgresql://" in unavailable["error"]
    assert health_seen, "the restart was over before /healthz could tell"
    assert any("STATUS=waiting for the database" in d for d in datagrams), datagrams
