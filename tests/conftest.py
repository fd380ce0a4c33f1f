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


# Tests over ~4 s (a serial run's --durations), longest first, by file and function (every
# parameter): run first (pytest_collection_modifyitems). One missing only costs time at the end.
SLOW_TESTS: tuple[tuple[str, str], ...] = (
    (
        "crash/test_kill_and_restart.py",
        "test_kills_inside_the_harvest_of_a_late_batch_lose_nothing_and_account_for_every_payment",
    ),  # 37 s
    (
        "crash/test_kill_and_restart.py",
        "test_kill_at_every_named_point_then_restart_loses_and_duplicates_nothing",
    ),  # 20-29 s
    (
        "crash/test_kill_and_restart.py",
        "test_kills_at_random_moments_with_faults_lose_and_duplicate_nothing",
    ),  # 17-20 s
    (
        "crash/test_two_daemons.py",
        "test_the_leader_killed_at_each_point_is_replaced_and_nothing_is_lost",
    ),  # 20 s
    ("test_cli.py", "test_enqueue_run_status_results_cancel_retry"),  # 14-20 s
    (
        "crash/test_shared_collection.py",
        "test_the_daemon_killed_mid_write_back_is_taken_over_without_waiting_for_its_lease",
    ),  # 5 points, 5-7 s each
    (
        "crash/test_shared_collection.py",
        "test_the_standby_collects_ended_batches_and_no_task_is_done_twice",
    ),  # 8 s
    (
        "test_harvest_e2e.py",
        "test_a_dropped_create_found_after_its_resubmission_is_harvested_not_paid_again",
    ),  # 18 s
    ("test_cli_accounting.py", "test_estimate_run_status_watch_and_prune"),  # 16-17 s
    (
        "test_harvest_e2e.py",
        "test_another_client_on_the_key_is_recognised_and_our_own_batch_harvested",
    ),  # 9 s
    (
        "test_harvest_e2e.py",
        "test_half_the_creates_dropped_beside_another_client_pays_no_request_a_third_time",
    ),  # 9 s
    (
        "test_cli_accounting.py",
        "test_a_spent_budget_ends_an_exit_when_idle_run_and_status_says_so",
    ),  # 7 s
    (
        "test_operator_cli.py",
        "test_an_acknowledged_duplicate_stays_on_record_and_is_no_longer_alarmed",
    ),  # 4-7 s
    ("test_store.py", "test_write_results_of_100k_outcomes_completes"),  # 6 s
    (
        "test_postgres_listen.py",
        "test_the_daemon_creates_a_batch_for_a_users_insert_at_once_not_at_the_tick",
    ),  # 6 s
    ("test_journald.py", "test_every_line_carries_its_level_as_a_syslog_priority"),  # 6 s
    (
        "fakeapi/test_fake_scale.py",
        "test_100k_requests_are_accepted_and_stream_back_complete",
    ),  # 6 s
    (
        "test_collector.py",
        "test_kill_after_staging_before_applying_then_restart_pays_nothing_twice",
    ),  # 5 s
    ("test_faults.py", "test_api_down_for_a_while_the_daemon_backs_off_and_catches_up"),  # 5 s
    (
        "test_cli_accounting.py",
        "test_on_a_terminal_run_draws_a_bar_and_watch_redraws_the_screen",
    ),  # 5 s
    ("test_operator_cli.py", "test_results_to_an_existing_file_is_refused_without_force"),  # 4-5 s
    ("test_operator_cli.py", "test_cancel_by_status_leaves_the_other_status_alone"),  # 3-5 s
    ("test_cli.py", "test_demo_runs_to_completion"),  # 4 s
    (
        "test_postgres_fixture.py",
        "test_with_a_server_the_test_runs_on_a_database_dropped_afterwards",
    ),  # 4 s
)
_SLOW_RANK = {f"{file}::{function}": rank for rank, (file, function) in enumerate(SLOW_TESTS)}
_TESTS_DIR = Path(__file__).parent


def _slow_rank(item: pytest.Item) -> int:
    """Where `item` runs among the slow ones (a `slow` marker: after the listed ones);
    len(SLOW_TESTS) + 1 for the others."""
    name = getattr(item, "originalname", item.name)
    rank = _SLOW_RANK.get(f"{item.path.relative_to(_TESTS_DIR).as_posix()}::{name}")
    if rank is not None:
        return rank
    return len(SLOW_TESTS) if item.get_closest_marker("slow") is not None else len(SLOW_TESTS) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, longest first (SLOW_TESTS, then the `slow` marker), the rest in
    their usual order: with `--maxschedchunk 1` each pytest-xdist worker takes the next test
    as it frees up, so the longest are spread over the workers at the start and the short
    ones fill in around them (README's test command). Run alone, the order changes nothing."""
    items.sort(key=_slow_rank)


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
