"""Shared fixtures: a real SQLite file, the fake API on loopback, a daemon config."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Config, DatabaseConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.logs import configure_logging

# Before the first import of a helper, so its asserts explain themselves as a test's do.
pytest.register_assert_rewrite("tests.support")
from tests.support.store import FakeClock  # noqa: E402

# Fixtures for tests that run batchd as users do (`fake_api_process`, `cli_env`).
pytest_plugins = [
    "tests.support.cli",
    "tests.support.postgres",  # a PostgreSQL server and a database per session
    "tests.support.pgcluster",  # a throwaway cluster of the session's own, to restart
    "tests.support.backends",  # `store`, `peek`, `database_config` on either database
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_stores: tests using the store run on SQLite and on PostgreSQL"
    )
    config.addinivalue_line(
        "markers", "fake_clock: the store runs on the test's `clock`, not on real time"
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only: of a module run on both stores, run on SQLite alone (why: its docstring)",
    )
    config.addinivalue_line(
        "markers",
        "slow: takes several seconds (a real wait the test is about); run first, so that "
        "pytest-xdist's workers share them out and finish together",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests first, the rest in their usual order: with `--maxschedchunk 1` each
    worker takes the next test as it frees up, so the longest are spread over the workers
    at the start and the short ones fill in around them (README's test command)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "batchd.db"


@pytest.fixture
def clock() -> FakeClock:
    """A clock that stands at `START` until the test moves it."""
    return FakeClock()


@pytest.fixture
def store_clock(request: pytest.FixtureRequest) -> Callable[[], datetime] | None:
    """The store's clock: real time, or the test's `clock` where the module is marked
    `pytestmark = pytest.mark.fake_clock`."""
    if request.node.get_closest_marker("fake_clock") is None:
        return None
    clock: FakeClock = request.getfixturevalue("clock")
    return clock


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApiServer]:
    """The fake API with a short timeline, started in-process on a free port."""
    async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=0.3, seed=1)) as server:
        yield server


@pytest.fixture
def daemon_config(database_config: DatabaseConfig) -> Callable[..., Config]:
    """A Config for the daemon under test, with quick timings; override per test."""

    def make(base_url: str, **batching: Any) -> Config:
        config = Config()
        return replace(
            config,
            database=database_config,
            api=replace(config.api, base_url=base_url, max_retries=3, request_timeout_s=10.0),
            # A short watch for late batches: `--exit-when-idle` waits for it to end.
            batching=replace(
                config.batching, **{"linger_s": 0.05, "duplicate_watch_s": 1.0, **batching}
            ),
            polling=replace(config.polling, interval_s=0.1, not_found_grace_s=1.0),
        )

    return make


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only, so a failing test's output shows what matters."""
    configure_logging("console", "warning")
