"""`python -m batchd.fakeapi` as a process: prints its URL, serves, stops cleanly."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from batchd.fakeapi.server import add_arguments, config_from_args
from tests.support.fakeapi import HEADERS, requests_body, spawn, start_process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serves_until_a_signal_and_exits_0(signum: int, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    process, base_url = await start_process(
        "--processing-seconds", "0", "--seed", "1", "--state", str(state)
    )
    try:
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{base_url}/v1/messages/batches", json=requests_body(2)) as r:
                assert r.status == 200
                batch = await r.json()
            assert batch["processing_status"] == "ended"  # --processing-seconds 0
            assert batch["results_url"].startswith(base_url)
    finally:
        process.send_signal(signum)
        code = await asyncio.wait_for(process.wait(), 10)
    assert code == 0
    assert batch["id"] in state.read_text()


async def test_bad_fault_settings_exit_2_with_a_message() -> None:
    process = await spawn("--fault-kinds", "418")
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert b"unknown fault kind '418'" in stderr


def test_every_flag_reaches_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(
        parser.parse_args(
            [
                "--host",
                "0.0.0.0",
                "--port",
                "9999",
                "--api-key",
                "k",
                "--processing-seconds",
                "2",
                "--expiry-seconds",
                "60",
                "--cancel-delay-seconds",
                "0.5",
                "--incremental-counts",
                "--models",
                "a, b",
                "--seed",
                "5",
                "--state",
                str(tmp_path / "s.json"),
                "--error-rate",
                "0.1",
                "--retryable-error-share",
                "0.9",
                "--expire-rate",
                "0.05",
                "--fault-rate",
                "0.2",
                "--fault-kinds",
                "429,commit_drop",
                "--fault-endpoints",
                "create,results",
                "--retry-after",
                "4",
                "--slow-seconds",
                "3",
                "--late-create-seconds",
                "7",
                "--fault-limit",
                "2",
                "--results-truncate-rate",
                "0.3",
                "--not-found-after-create-seconds",
                "6",
                "--list-lag-seconds",
                "8",
            ]
        )
    )
    assert (config.host, config.port, config.api_key) == ("0.0.0.0", 9999, "k")
    assert config.processing_seconds == 2
    assert config.expiry_seconds == 60
    assert config.cancel_delay_seconds == 0.5
    assert config.incremental_counts
    assert config.models == ("a", "b")
    assert config.seed == 5
    assert config.state_path == tmp_path / "s.json"
    faults = config.faults
    assert (faults.error_rate, faults.retryable_error_share, faults.expire_rate) == (0.1, 0.9, 0.05)
    assert faults.http_fault_rate == 0.2
    assert faults.http_fault_kinds == ("429", "commit_drop")
    assert faults.http_fault_endpoints == ("create", "results")
    assert (faults.retry_after_seconds, faults.slow_seconds) == (4, 3)
    assert faults.results_truncate_rate == 0.3
    assert faults.not_found_after_create_seconds == 6
    assert (faults.late_create_seconds, faults.http_fault_limit) == (7, 2)
    assert faults.list_lag_seconds == 8
