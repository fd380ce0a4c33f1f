"""The API key is checked at start with one cheap call (list, limit=1): a refused key ends
the start with exit 78 naming where the key came from (never the key), transport faults
are retried and logged, and /healthz reports a refused key."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog

from batchd.api import BatchesClient, RetryPolicy
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.exits import EXIT_CONFIG
from batchd.service.health import Health
from batchd.service.keycheck import ApiKeyCheck, KeyState
from batchd.service.metrics import batchd_registry
from batchd.service.web.server import MetricsServer
from tests.support.cli import batchd, fake_api_command

RIGHT_KEY = "sk-the-right-key"
WRONG_KEY = "sk-a-wrong-key"


@pytest.fixture
def fake_with_key() -> Iterator[str]:
    """`batchd fake-api --api-key ...`: only that key is accepted."""
    with fake_api_command("--api-key", RIGHT_KEY) as base_url:
        yield base_url


def run_env(tmp_path: Path, base_url: str, extra_toml: str = "") -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{tmp_path / "b.db"}"\n{extra_toml}')
    environment = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    return {**environment, "BATCHD_CONFIG": str(config), "ANTHROPIC_BASE_URL": base_url}


def events(stdout: bytes) -> dict[str, dict[str, object]]:
    return {e["event"]: e for e in map(orjson.loads, stdout.splitlines())}


def test_a_refused_key_ends_the_start_with_78_naming_the_variable(
    tmp_path: Path, fake_with_key: str
) -> None:
    env = {**run_env(tmp_path, fake_with_key), "ANTHROPIC_API_KEY": WRONG_KEY}
    # `run`, not --exit-when-idle, and an empty queue: nothing but the check calls the API.
    result = batchd("run", env=env, timeout=30)
    assert result.returncode == EXIT_CONFIG
    refused = events(result.stdout)["api_key_refused"]
    assert refused["level"] == "error"
    assert refused["key_source"] == "$ANTHROPIC_API_KEY"
    assert "loops not running" not in result.stderr.decode()
    assert "key from $ANTHROPIC_API_KEY" in result.stderr.decode()
    assert WRONG_KEY.encode() not in result.stdout + result.stderr
    assert b"Traceback" not in result.stdout + result.stderr


def test_a_refused_key_from_a_file_names_the_file(tmp_path: Path, fake_with_key: str) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(WRONG_KEY + "\n")
    env = run_env(tmp_path, fake_with_key, f'[api]\napi_key_file = "{key_file}"\n')
    result = batchd("run", env=env, timeout=30)
    assert result.returncode == EXIT_CONFIG
    assert f"key from [api] api_key_file {key_file}" in result.stderr.decode()
    assert WRONG_KEY.encode() not in result.stdout + result.stderr


def test_an_accepted_key_is_logged_as_such(tmp_path: Path, fake_with_key: str) -> None:
    env = {**run_env(tmp_path, fake_with_key), "ANTHROPIC_API_KEY": RIGHT_KEY}
    result = batchd("run", "--exit-when-idle", env=env, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert events(result.stdout)["api_key_accepted"]["key_source"] == "$ANTHROPIC_API_KEY"


async def test_transport_faults_are_retried_and_the_key_stays_unchecked() -> None:
    faults = FaultConfig(http_fault_rate=1.0, http_fault_kinds=("500",))
    retried: list[str] = []  # the client logs each as `api_retry` (info)
    async with FakeApiServer(FakeApiConfig(faults=faults)) as fake, aiohttp.ClientSession() as s:
        client = BatchesClient(
            s,
            base_url=fake.base_url,
            api_key=RIGHT_KEY,
            policy=RetryPolicy(max_retries=2, base_delay_s=0.01),
            on_retry=retried.append,
        )
        check = ApiKeyCheck("$TEST_KEY", start_wait_s=5.0)
        with structlog.testing.capture_logs() as logs:
            assert await check.verify(client) is KeyState.UNCHECKED
    assert retried == ["list", "list"]  # with the client's backoff
    [unchecked] = logs
    assert unchecked["event"] == "api_key_unchecked"
    assert unchecked["log_level"] == "warning"
    assert "HTTP 500" in unchecked["error"]
    assert check.health_problem() is None  # unreachable is reported by reachability, not here


async def test_a_key_refused_on_a_recheck_stops_the_daemon_and_healthz_says_so() -> None:
    async with (
        FakeApiServer(FakeApiConfig(api_key=RIGHT_KEY)) as fake,
        aiohttp.ClientSession() as session,
    ):
        client = BatchesClient(session, base_url=fake.base_url, api_key=WRONG_KEY)
        check = ApiKeyCheck("$TEST_KEY", recheck_s=0.01)
        stopped: list[int] = []
        await asyncio.wait_for(check.recheck(client, stopped.append), 10)
        assert (check.state, stopped) == (KeyState.REFUSED, [EXIT_CONFIG])

        async def health() -> Health:
            problem = check.health_problem()
            return Health((problem,) if problem else ())

        async with MetricsServer(batchd_registry(), health) as server:
            url = f"http://127.0.0.1:{server.port}/healthz"
            async with session.get(url) as response:
                assert response.status == 503
                assert await response.text() == (
                    "api key refused by the API (key from $TEST_KEY)\n"
                )
