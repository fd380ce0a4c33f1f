"""The Prometheus registry's text (prometheus_client's), and /metrics and /healthz over
real loopback HTTP."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import aiosqlite
import prometheus_client
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from batchd.service.health import ApiReachability, Health, api_observer
from batchd.service.metrics import (
    API_ERRORS,
    API_REQUESTS,
    BATCHD_METRICS,
    BATCHES_IN_FLIGHT,
    CALLBACK_ERRORS,
    CONTENT_TYPE,
    LAST_POLL,
    REQUESTS_SUBMITTED,
    TASKS,
    TOKENS,
    MetricSpec,
    Registry,
    batchd_registry,
)
from batchd.service.web.server import MetricsServer

# --- the text format -------------------------------------------------------------------


def parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, read back by prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_render_is_the_text_format_with_help_type_and_escaping() -> None:
    registry = Registry(
        [
            MetricSpec("demo_requests_total", "counter", 'Requests.\nSee "docs" \\ here.'),
            MetricSpec("demo_items", "gauge", "Items by path.", ("path", "kind")),
        ]
    )
    registry.inc("demo_requests_total", 2)
    registry.set("demo_items", 1.5, kind="a", path='C:\\dir "x"\nnext')
    registry.set("demo_items", 3, path="/b", kind="b")
    text = registry.render()
    assert text.startswith(
        '# HELP demo_requests_total Requests.\\nSee "docs" \\\\ here.\n'
        "# TYPE demo_requests_total counter\n"
        "demo_requests_total 2.0\n"
    )
    assert "demo_requests_total_created" not in text  # no _created twin series
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["demo_requests"].documentation == 'Requests.\nSee "docs" \\ here.'
    assert parsed(text) == {
        ("demo_requests_total", frozenset()): 2,
        ("demo_items", frozenset({("path", "/b"), ("kind", "b")})): 3,
        ("demo_items", frozenset({("path", 'C:\\dir "x"\nnext'), ("kind", "a")})): 1.5,
    }


def test_labels_are_matched_by_name_whatever_the_keyword_order() -> None:
    registry = Registry([API_REQUESTS])
    registry.inc(API_REQUESTS, status=200, endpoint="create")
    registry.inc(API_REQUESTS, endpoint="create", status=200)
    registry.inc(API_REQUESTS, endpoint="poll", status=429)
    assert registry.render().splitlines()[2:] == [
        'batchd_api_requests_total{endpoint="create",status="200"} 2.0',
        'batchd_api_requests_total{endpoint="poll",status="429"} 1.0',
    ]
    assert registry.value(API_REQUESTS, endpoint="create", status="200") == 2


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0.0"), (12_400, "12400.0"), (0.25, "0.25"), (math.inf, "+Inf"), (-math.inf, "-Inf")],
)
def test_values_render_as_prometheus_numbers(value: float, text: str) -> None:
    registry = Registry([MetricSpec("demo", "gauge", "A number.")])
    registry.set("demo", value)
    assert registry.render().splitlines()[-1] == f"demo {text}"


def test_nan_renders_as_nan() -> None:
    registry = Registry([MetricSpec("demo", "gauge", "A number.")])
    registry.set("demo", math.nan)
    assert registry.render().splitlines()[-1] == "demo NaN"


def test_two_registries_share_no_series() -> None:
    # Our own CollectorRegistry each, never prometheus_client's global one.
    first, second = batchd_registry(), batchd_registry()
    first.inc(REQUESTS_SUBMITTED, 5)
    assert (first.value(REQUESTS_SUBMITTED), second.value(REQUESTS_SUBMITTED)) == (5, 0)
    assert "batchd_" not in generate_latest(prometheus_client.REGISTRY).decode()


def test_misuse_is_refused_loudly() -> None:
    registry = Registry([API_REQUESTS, MetricSpec("demo", "gauge", "A number.")])
    with pytest.raises(ValueError, match="takes labels"):
        registry.inc(API_REQUESTS, endpoint="create")
    with pytest.raises(ValueError, match="cannot decrease"):
        registry.inc(API_REQUESTS, -1, endpoint="create", status=200)
    with pytest.raises(ValueError, match="only gauges"):
        registry.set(API_REQUESTS, 1, endpoint="create", status=200)
    with pytest.raises(KeyError, match="not registered"):
        registry.inc("batchd_nope_total")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(API_REQUESTS)
    with pytest.raises(ValueError, match="invalid label name"):
        MetricSpec("demo", "gauge", "x", ("bad-name",))
    with pytest.raises(ValueError, match="invalid metric name"):
        MetricSpec("demo metric", "gauge", "x")
    with pytest.raises(ValueError, match="must end in _total"):
        MetricSpec("demo_requests", "counter", "x")


def test_batchd_registry_declares_every_metric_and_starts_series_at_zero() -> None:
    text = batchd_registry().render()
    for spec in BATCHD_METRICS:
        assert f"# HELP {spec.name} " in text
        assert f"# TYPE {spec.name} {spec.kind}\n" in text
    # rate() needs a series from the first scrape on, not from the first increment.
    samples = parsed(text)
    assert samples[("batchd_requests_submitted_total", frozenset())] == 0
    assert samples[("batchd_batches_created_total", frozenset())] == 0
    assert samples[("batchd_tokens_total", frozenset({("kind", "cache_read_input")}))] == 0
    names = {spec.name for spec in BATCHD_METRICS}
    assert {
        "batchd_tasks",
        "batchd_batches_in_flight",
        "batchd_requests_submitted_total",
        "batchd_results_written_total",
        "batchd_api_requests_total",
        "batchd_api_errors_total",
        "batchd_retries_total",
        "batchd_tokens_total",
        "batchd_batches_created_total",
    } <= names


async def test_a_failing_callback_leaves_its_gauge_empty_and_is_counted() -> None:
    registry = batchd_registry()
    healthy = True

    async def in_flight() -> float:
        if not healthy:
            raise RuntimeError("database is locked")
        return 3

    registry.set_callback(BATCHES_IN_FLIGHT, in_flight)
    await registry.refresh()
    assert "batchd_batches_in_flight 3.0\n" in registry.render()
    healthy = False
    with capture_logs() as logs:
        await registry.refresh()
    # A stale "3" would look true; a missing sample shows up as a gap on the dashboard.
    assert "\nbatchd_batches_in_flight " not in registry.render()
    assert registry.value(CALLBACK_ERRORS, metric="batchd_batches_in_flight") == 1
    assert [entry["event"] for entry in logs] == ["metrics_callback_failed"]


async def test_callbacks_fill_metrics_with_at_most_one_label() -> None:
    registry = batchd_registry()

    async def nothing() -> float:
        return 0

    with pytest.raises(ValueError, match="at most one label"):
        registry.set_callback(API_REQUESTS, nothing)  # endpoint and status

    async def ledger_total() -> float:
        return 42

    # A counter may come from a running total kept elsewhere (the usage ledger).
    registry.set_callback(REQUESTS_SUBMITTED, ledger_total)
    await registry.refresh()
    assert "batchd_requests_submitted_total 42.0\n" in registry.render()


async def test_callback_shape_must_match_the_labels() -> None:
    registry = batchd_registry()

    async def a_number() -> float:
        return 1

    registry.set_callback(TASKS, a_number)
    with capture_logs():
        await registry.refresh()
    assert registry.value(CALLBACK_ERRORS, metric="batchd_tasks") == 1


def test_api_reachability_tolerates_idleness_and_short_outages() -> None:
    now = 1000.0
    reachability = ApiReachability(clock=lambda: now)
    assert reachability.problem(300) is None  # no call made yet: nothing wrong
    reachability.record_failure()
    now += 299
    assert reachability.problem(300) is None
    reachability.record_failure()  # still failing since the first failure
    now += 1
    assert reachability.problem(300) == "API unreachable for 300 s"
    reachability.record_success()
    assert reachability.problem(300) is None


def test_api_observer_counts_responses_and_tracks_reachability() -> None:
    now = 0.0
    registry = batchd_registry()
    reachability = ApiReachability(clock=lambda: now)
    on_response = api_observer(registry, reachability)
    on_response("create", 200, 0.2)
    on_response("retrieve", 429, 0.1)  # rate limited: the API answered
    assert reachability.problem(0) is None
    on_response("retrieve", 0, 30.0)  # no response at all
    on_response("retrieve", 529, 0.1)
    assert reachability.problem(0) == "API unreachable for 0 s"
    assert registry.value(API_REQUESTS, endpoint="create", status=200) == 1
    assert registry.value(API_REQUESTS, endpoint="retrieve", status=429) == 1
    assert registry.value(API_REQUESTS, endpoint="retrieve", status=529) == 1
    assert registry.value(API_ERRORS, endpoint="retrieve", kind="http") == 2
    assert registry.value(API_ERRORS, endpoint="retrieve", kind="connection") == 1
    on_response("retrieve", 200, 0.1)
    assert reachability.problem(0) is None


def test_last_successful_poll_starts_at_start_and_moves_only_on_an_answered_poll() -> None:
    wall = 1_700_000_000.0
    registry = batchd_registry()
    on_response = api_observer(registry, ApiReachability(), wall_clock=lambda: wall)
    assert registry.value(LAST_POLL) == 1_700_000_000  # "no poll for N min" counts from start
    for endpoint, status in [
        ("retrieve", 0),
        ("retrieve", 529),
        ("retrieve", 404),
        ("create", 200),
    ]:
        wall += 60
        on_response(endpoint, status, 0.1)
    assert registry.value(LAST_POLL) == 1_700_000_000
    wall += 60
    on_response("retrieve", 200, 0.1)
    assert registry.value(LAST_POLL) == 1_700_000_300


async def test_a_callback_with_nothing_to_report_leaves_no_sample() -> None:
    registry = batchd_registry()

    async def nothing() -> None:
        return None

    registry.set_callback(BATCHES_IN_FLIGHT, nothing)
    await registry.refresh()
    text = registry.render()
    assert "# TYPE batchd_batches_in_flight gauge\n" in text
    assert "\nbatchd_batches_in_flight " not in text
    assert registry.value(CALLBACK_ERRORS, metric="batchd_batches_in_flight") == 0


# --- the HTTP listener, against a real database ----------------------------------------


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    async with aiosqlite.connect(tmp_path / "tasks.db", isolation_level=None) as db:
        await db.execute("CREATE TABLE tasks (custom_id TEXT PRIMARY KEY, status TEXT)")
        await db.execute("CREATE TABLE batches (id INTEGER PRIMARY KEY, state TEXT)")
        yield db


class FakeDaemonHealth:
    """What the daemon's health check would report, switchable by the test."""

    def __init__(self) -> None:
        self.reasons: tuple[str, ...] = ()

    async def __call__(self) -> Health:
        return Health(self.reasons)


@pytest.fixture
async def served(
    database: aiosqlite.Connection,
) -> AsyncIterator[tuple[str, Registry, FakeDaemonHealth]]:
    registry = batchd_registry()

    async def task_counts() -> Mapping[str, int]:
        async with database.execute("SELECT status, count(*) FROM tasks GROUP BY status") as cur:
            return {str(status): int(count) async for status, count in cur}

    async def batches_in_flight() -> int:
        sql = "SELECT count(*) FROM batches WHERE state IN ('creating', 'in_progress')"
        async with database.execute(sql) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    registry.set_callback(TASKS, task_counts)
    registry.set_callback(BATCHES_IN_FLIGHT, batches_in_flight)
    health = FakeDaemonHealth()
    async with AsyncExitStack() as stack:
        server = MetricsServer(registry, health, port=0)
        await stack.enter_async_context(server)
        yield f"http://127.0.0.1:{server.port}", registry, health


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_metrics_reflect_the_database_at_scrape_time(
    served: tuple[str, Registry, FakeDaemonHealth], database: aiosqlite.Connection
) -> None:
    base_url, registry, _ = served
    await database.executemany(
        "INSERT INTO tasks VALUES (?, ?)",
        [("a", "pending"), ("b", "pending"), ("c", "succeeded")],
    )
    await database.execute("INSERT INTO batches (state) VALUES ('in_progress'), ('completed')")
    registry.inc(TOKENS, 1200, kind="input")

    status, content_type, text = await get(f"{base_url}/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE
    assert 'batchd_tasks{status="pending"} 2.0\n' in text
    assert 'batchd_tasks{status="succeeded"} 1.0\n' in text
    assert "batchd_batches_in_flight 1.0\n" in text
    assert 'batchd_tokens_total{kind="input"} 1200.0\n' in text

    await database.execute("UPDATE tasks SET status = 'submitted' WHERE custom_id = 'a'")
    _, _, text = await get(f"{base_url}/metrics")
    assert 'batchd_tasks{status="pending"} 1.0\n' in text
    assert 'batchd_tasks{status="submitted"} 1.0\n' in text


async def test_healthz_is_200_ok_only_when_healthy(
    served: tuple[str, Registry, FakeDaemonHealth],
) -> None:
    base_url, _, health = served
    assert await get(f"{base_url}/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    health.reasons = ("database not answering", "API unreachable for 301 s")
    status, _, text = await get(f"{base_url}/healthz")
    assert (status, text) == (503, "database not answering\nAPI unreachable for 301 s\n")


async def test_healthz_is_503_when_the_check_fails_or_hangs() -> None:
    async def broken() -> Health:
        raise RuntimeError("boom")

    async def hung() -> Health:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    registry = Registry()
    async with MetricsServer(registry, broken) as server:
        with capture_logs():
            status, _, text = await get(f"http://127.0.0.1:{server.port}/healthz")
        assert (status, text) == (503, "health check failed: RuntimeError\n")
    async with MetricsServer(registry, hung, health_timeout_s=0.1) as server:
        status, _, text = await get(f"http://127.0.0.1:{server.port}/healthz")
        assert (status, text) == (503, "health check did not answer within 0.1 s\n")


async def test_server_binds_loopback_by_default_and_stops_cleanly() -> None:
    server = MetricsServer(Registry(), FakeDaemonHealth())
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    await server.start()
    port = server.port
    assert port > 0
    with pytest.raises(aiohttp.ClientConnectorError):
        # Not reachable on another local address: bound to 127.0.0.1 only.
        await get(f"http://127.0.0.2:{port}/healthz")
    await server.stop()
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        await get(f"http://127.0.0.1:{port}/healthz")
