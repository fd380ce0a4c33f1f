"""Running batchd as users do: real processes, a real `batchd fake-api`, a config file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from batchd.config import DatabaseConfig

BATCHD = [sys.executable, "-m", "batchd"]


def batchd(
    *args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*BATCHD, *args], env=env, input=stdin, capture_output=True, timeout=timeout, check=False
    )


@pytest.fixture
def fake_api_process() -> Iterator[str]:
    """`batchd fake-api --port 0` as a user starts it; yields the base URL it prints."""
    with fake_api_command("--processing-seconds", "0.2") as base_url:
        yield base_url


@contextmanager
def fake_api_command(*args: str) -> Iterator[str]:
    """`batchd fake-api --port 0 ARGS` in a process of its own; yields the base URL it
    prints, and stops it with SIGTERM (a clean stop: exit 0) on the way out."""
    process = subprocess.Popen(
        [*BATCHD, "fake-api", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        assert process.returncode == 0  # SIGTERM is a clean stop


@pytest.fixture
def cli_env(
    tmp_path: Path, fake_api_process: str, database_config: DatabaseConfig
) -> dict[str, str]:
    """A config file for the test's store: `cli.db` in tmp_path, or (a `both_stores` test
    on PostgreSQL) the test's database and schema."""
    config = tmp_path / "batchd.toml"
    if database_config.url is None:
        database = f'path = "{tmp_path / "cli.db"}"\n'
    else:
        database = f'url = "{database_config.url}"\nschema = "{database_config.schema}"\n'
    config.write_text(
        f"[database]\n{database}"
        "[batching]\nlinger_seconds = 0.05\nmax_requests = 4\n"
        "[polling]\ninterval_seconds = 0.1\n"
    )
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_BASE_URL": fake_api_process,
        "ANTHROPIC_API_KEY": "sk-test-secret-key",
    }


def database_env(tmp_path: Path, database: DatabaseConfig) -> dict[str, str]:
    """The environment of a `batchd` process on the test's store (a config file naming
    its SQLite file, or its PostgreSQL database and schema); no API."""
    config = tmp_path / "batchd.toml"
    if database.url is None:
        config.write_text(f'[database]\npath = "{database.path}"\n')
    else:
        config.write_text(f'[database]\nurl = "{database.url}"\nschema = "{database.schema}"\n')
    return {**os.environ, "BATCHD_CONFIG": str(config)}
