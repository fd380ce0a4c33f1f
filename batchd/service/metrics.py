"""batchd's Prometheus metrics: their definitions, and a registry of our own to count in.

prometheus_client keeps the series and writes the text exposition format. Two kinds of
metric live here: counters and gauges that the daemon updates as things happen (API
responses, batches created, results written), and scrape-time metrics that describe the
database. prometheus_client's collectors are synchronous, so the scrape-time ones are
filled by async callbacks that the HTTP handler awaits (`Registry.refresh`) just before
it renders: /metrics shows what the database says now, not what the daemon remembered.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

log = structlog.get_logger("batchd.service.metrics")

# generate_latest writes the classic text format; say so, so any Prometheus parses it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Counters otherwise grow a `_created` twin series per label set: noise on every scrape
# that no rule or panel of ours reads. Process-wide, and batchd is the process.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

MetricKind = Literal["counter", "gauge"]
# A metric with one label is filled with {label value: number}; without labels, a number;
# None leaves the metric without samples (nothing to report, e.g. no batch in flight).
ScrapeValue = Mapping[str, float] | float | None
GaugeCallback = Callable[[], Awaitable[ScrapeValue]]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric's name, type, help text and label names."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total (Prometheus naming)")
        for label in self.labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} on {self.name}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate label name on {self.name}")


# --- what the daemon counts as it goes ---------------------------------------------------

REQUESTS_SUBMITTED = MetricSpec(
    "batchd_requests_submitted_total", "counter", "Requests sent to the API inside batches."
)
RESULTS_WRITTEN = MetricSpec(
    "batchd_results_written_total",
    "counter",
    "Result lines written to the database, by outcome.",
    ("outcome",),
)
API_REQUESTS = MetricSpec(
    "batchd_api_requests_total",
    "counter",
    "HTTP responses from the API, by endpoint and status code.",
    ("endpoint", "status"),
)
API_ERRORS = MetricSpec(
    "batchd_api_errors_total",
    "counter",
    "API calls that failed, by endpoint and kind (connection: no response; http: 4xx/5xx).",
    ("endpoint", "kind"),
)
RETRIES = MetricSpec(
    "batchd_retries_total", "counter", "API calls retried after a failure.", ("endpoint",)
)
BATCHES_CREATED = MetricSpec("batchd_batches_created_total", "counter", "Batches created.")
CALLBACK_ERRORS = MetricSpec(
    "batchd_metrics_callback_errors_total",
    "counter",
    "Scrape-time callbacks that failed; their metrics are left out of that scrape.",
    ("metric",),
)
LAST_POLL = MetricSpec(
    "batchd_last_successful_poll_timestamp_seconds",
    "gauge",
    "Unix time of the last poll the API answered (the daemon's start until the first).",
)
# Issue 13: several daemons on one PostgreSQL database.
LEADER = MetricSpec(
    "batchd_leader",
    "gauge",
    "1 while this daemon leads (submits, reconciles, cancels); 0 while it stands by and"
    " only polls and collects (PostgreSQL: another daemon leads).",
)
COLLECTIONS = MetricSpec(
    "batchd_collections_total",
    "counter",
    "Ended batches this daemon took to collect, by event (taken; taken_over: the lease of"
    " a daemon that stopped renewing had lapsed; lease_lost: another daemon took ours).",
    ("event",),
)

# --- what the database says, read at scrape time (batchd/service/gauges.py) ---------------

TASKS = MetricSpec("batchd_tasks", "gauge", "Tasks in the database by status.", ("status",))
BATCHES_IN_FLIGHT = MetricSpec(
    "batchd_batches_in_flight",
    "gauge",
    "Batches being created, processed or canceled by the API.",
)
TOKENS = MetricSpec(
    "batchd_tokens_total",
    "counter",
    "Tokens reported in result usage, by kind (the usage ledger's running totals).",
    ("kind",),
)
OLDEST_PENDING_AGE = MetricSpec(
    "batchd_oldest_pending_task_age_seconds",
    "gauge",
    "Age of the oldest pending task (0 when none is pending).",
)
OLDEST_BATCH_AGE = MetricSpec(
    "batchd_oldest_in_flight_batch_age_seconds",
    "gauge",
    "Age of the oldest batch in flight, from its creation (0 when none is in flight).",
)
NEXT_EXPIRY = MetricSpec(
    "batchd_next_batch_expiry_seconds",
    "gauge",
    "Seconds until the nearest in-flight batch reaches the API's 24 h expiry "
    "(negative once past; no sample when no batch is in flight).",
)
BUDGET_SPENT = MetricSpec(
    "batchd_budget_period_spent_usd",
    "gauge",
    "Cost of results written in the budget period ([budget] period, UTC), batch prices.",
)
BUDGET_LIMIT = MetricSpec(
    "batchd_budget_max_spend_usd",
    "gauge",
    "[budget] max_spend_usd for the period (no sample when no budget is set).",
)
BUDGET_PAUSED = MetricSpec(
    "batchd_budget_paused",
    "gauge",
    "1 while submission waits because the next batch would pass the budget, else 0.",
)
# Issue 15: batches on the key batchd did not create, and suspected duplicates harvested.
FOREIGN_BATCHES_LISTED = MetricSpec(
    "batchd_foreign_batches_listed_total",
    "counter",
    "Batches seen on the API's list in a reconcile window that batchd did not create.",
)
CANDIDATE_BATCHES = MetricSpec(
    "batchd_candidate_batches",
    "gauge",
    "Suspected duplicate batches by harvest state (in_progress, ended: being read;"
    " harvested; foreign: another client's; lost, unread: never read).",
    ("state",),
)
FOREIGN_BATCHES = MetricSpec(
    "batchd_foreign_batches",
    "gauge",
    "Batches whose results named no task of ours (another client on this key).",
)

TOKEN_KINDS = ("input", "output", "cache_creation_input", "cache_read_input")


def harvest_state(state: str, origin: str | None) -> str:
    """A candidate batch's state as the gauge and `status` name it."""
    if origin == "foreign":
        return "foreign"
    return "harvested" if state == "completed" else state


BATCHD_METRICS = (
    TASKS,
    BATCHES_IN_FLIGHT,
    REQUESTS_SUBMITTED,
    RESULTS_WRITTEN,
    API_REQUESTS,
    API_ERRORS,
    RETRIES,
    TOKENS,
    BATCHES_CREATED,
    CALLBACK_ERRORS,
    LAST_POLL,
    OLDEST_PENDING_AGE,
    OLDEST_BATCH_AGE,
    NEXT_EXPIRY,
    BUDGET_SPENT,
    BUDGET_LIMIT,
    BUDGET_PAUSED,
    FOREIGN_BATCHES_LISTED,
    CANDIDATE_BATCHES,
    FOREIGN_BATCHES,
    LEADER,
    COLLECTIONS,
)


class _ScrapeCollector(Collector):
    """Yields the scrape-time metrics from what the last `Registry.refresh` read."""

    def __init__(self) -> None:
        self.specs: dict[str, MetricSpec] = {}
        self.samples: dict[str, dict[tuple[str, ...], float]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, spec in self.specs.items():
            family_type = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = family_type(name, spec.help, labels=spec.labels)
            for values, value in sorted(self.samples.get(name, {}).items()):
                family.add_metric(list(values), value)
            yield family


class Registry:
    """batchd's metrics on a prometheus_client registry of its own (never the global one,
    so that two daemons in one test process do not share series)."""

    def __init__(self, specs: Iterable[MetricSpec] = ()) -> None:
        self._prometheus = CollectorRegistry(auto_describe=False)
        self._specs: dict[str, MetricSpec] = {}
        self._live: dict[str, Counter | Gauge] = {}
        self._scraped = _ScrapeCollector()
        self._callbacks: dict[str, GaugeCallback] = {}
        self._prometheus.register(self._scraped)
        for spec in specs:
            self.register(spec)

    def register(self, spec: MetricSpec) -> None:
        """Add a metric; a label-less counter starts at 0 so rate() works from the start."""
        if spec.name in self._specs:
            raise ValueError(f"metric {spec.name} is already registered")
        self._specs[spec.name] = spec
        metric_type = Counter if spec.kind == "counter" else Gauge
        self._live[spec.name] = metric_type(
            spec.name, spec.help, spec.labels, registry=self._prometheus
        )

    def declares(self, spec: MetricSpec) -> bool:
        """Whether `spec` is registered here (a registry of a few metrics, in tests)."""
        return spec.name in self._specs

    def inc(self, name: str | MetricSpec, value: float = 1, **labels: str | int) -> None:
        """Add `value` (>= 0 for counters) to one labelled series."""
        spec = self._spec(name)
        if spec.kind == "counter" and value < 0:
            raise ValueError(f"counter {spec.name} cannot decrease (got {value})")
        self._series(spec, labels).inc(value)

    def set(self, name: str | MetricSpec, value: float, **labels: str | int) -> None:
        """Set a gauge's labelled series to `value`."""
        spec = self._spec(name)
        if spec.kind != "gauge":
            raise ValueError(f"{spec.name} is a {spec.kind}; only gauges can be set")
        series = self._series(spec, labels)
        assert isinstance(series, Gauge)
        series.set(value)

    def value(self, name: str | MetricSpec, **labels: str | int) -> float:
        """The current value of one series (0 if it has no sample)."""
        spec = self._spec(name)
        _check_labels(spec, labels)
        # prometheus_client calls its sample lookup a test helper (it collects everything):
        # tests read counters this way; the daemon never does on a hot path.
        found = self._prometheus.get_sample_value(spec.name, {k: str(v) for k, v in labels.items()})
        return 0.0 if found is None else found

    def set_callback(self, name: str | MetricSpec, callback: GaugeCallback) -> None:
        """Fill a metric at scrape time; its series are replaced by what the callback returns.

        Gauges, or counters whose source is itself a running total that never decreases
        (the usage ledger), so the database stays the one source of truth.
        """
        spec = self._spec(name)
        if len(spec.labels) > 1:
            raise ValueError(f"{spec.name}: callbacks fill metrics with at most one label")
        if spec.name in self._live:
            self._prometheus.unregister(self._live.pop(spec.name))
            self._scraped.specs[spec.name] = spec
        self._callbacks[spec.name] = callback

    async def refresh(self) -> None:
        """Run the scrape-time callbacks; one that fails leaves its metric empty and is counted."""
        for name, callback in self._callbacks.items():
            spec = self._specs[name]
            try:
                samples = _callback_samples(spec, await callback())
            except Exception as exc:  # noqa: BLE001 - any failure: one metric missing, not a 500
                # A stale number would look true; an absent one shows up as a gap.
                self._scraped.samples[name] = {}
                if CALLBACK_ERRORS.name in self._live:
                    self.inc(CALLBACK_ERRORS, metric=name)
                log.warning("metrics_callback_failed", metric=name, error=str(exc))
                continue
            self._scraped.samples[name] = samples

    def render(self) -> str:
        """The text exposition format (0.0.4), as prometheus_client writes it."""
        return generate_latest(self._prometheus).decode("utf-8")

    def _spec(self, name: str | MetricSpec) -> MetricSpec:
        key = name.name if isinstance(name, MetricSpec) else name
        try:
            return self._specs[key]
        except KeyError:
            raise KeyError(f"metric {key} is not registered") from None

    def _series(self, spec: MetricSpec, labels: Mapping[str, str | int]) -> Counter | Gauge:
        _check_labels(spec, labels)
        try:
            metric = self._live[spec.name]
        except KeyError:
            raise ValueError(f"{spec.name} is filled at scrape time; it cannot be set") from None
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric


def batchd_registry() -> Registry:
    """A registry with batchd's metrics, every token kind at 0 so its series exists at once."""
    registry = Registry(BATCHD_METRICS)
    for kind in TOKEN_KINDS:
        registry.inc(TOKENS, 0, kind=kind)
    return registry


def _check_labels(spec: MetricSpec, labels: Mapping[str, str | int]) -> None:
    if set(labels) != set(spec.labels):
        raise ValueError(f"{spec.name} takes labels {list(spec.labels)}, got {sorted(labels)}")


def _callback_samples(spec: MetricSpec, result: ScrapeValue) -> dict[tuple[str, ...], float]:
    if result is None:
        return {}
    if isinstance(result, int | float):
        if spec.labels:
            raise ValueError(f"{spec.name} has a label: its callback must return a mapping")
        return {(): float(result)}
    if not spec.labels:
        raise ValueError(f"{spec.name} has no labels: its callback must return a number")
    return {(str(label),): float(value) for label, value in result.items()}
