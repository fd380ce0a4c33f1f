"""Prometheus metrics and a health endpoint on an optional local HTTP listener.

A registry small enough to read at once, written to the text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/), so batchd needs no
client library. Gauges that describe the database (tasks by status, batches in
flight) are filled by async callbacks at scrape time: /metrics shows what the
database says now, not what the daemon last remembered.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import structlog
from aiohttp import web

log = structlog.get_logger("batchd.service.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricKind = Literal["counter", "gauge"]
# A gauge with one label returns {label value: number}; a gauge without labels a number.
GaugeCallback = Callable[[], Awaitable[Mapping[str, float] | float]]
_LabelValues = tuple[str, ...]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric's name, type, help text and label names (in the order they are rendered)."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        for label in self.labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} on {self.name}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate label name on {self.name}")


# The metrics batchd exports. Gauges about the database come from scrape-time callbacks.
TASKS = MetricSpec("batchd_tasks", "gauge", "Tasks in the database by status.", ("status",))
BATCHES_IN_FLIGHT = MetricSpec(
    "batchd_batches_in_flight",
    "gauge",
    "Batches being created, processed or canceled by the API.",
)
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
TOKENS = MetricSpec(
    "batchd_tokens_total",
    "counter",
    "Tokens reported in result usage, by kind.",
    ("kind",),
)
BATCHES_CREATED = MetricSpec("batchd_batches_created_total", "counter", "Batches created.")
CALLBACK_ERRORS = MetricSpec(
    "batchd_metrics_callback_errors_total",
    "counter",
    "Scrape-time callbacks that failed; their gauges are left out of that scrape.",
    ("metric",),
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
    FOREIGN_BATCHES_LISTED,
    CANDIDATE_BATCHES,
    FOREIGN_BATCHES,
)


class Registry:
    """Counters and gauges with labels, rendered in Prometheus text format 0.0.4."""

    def __init__(self, specs: Iterable[MetricSpec] = ()) -> None:
        self._specs: dict[str, MetricSpec] = {}
        self._samples: dict[str, dict[_LabelValues, float]] = {}
        self._callbacks: dict[str, GaugeCallback] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: MetricSpec) -> None:
        """Add a metric; a label-less counter starts at 0 so rate() works from the start."""
        if spec.name in self._specs:
            raise ValueError(f"metric {spec.name} is already registered")
        self._specs[spec.name] = spec
        self._samples[spec.name] = {} if spec.labels or spec.kind == "gauge" else {(): 0.0}

    def inc(self, name: str | MetricSpec, value: float = 1, **labels: str | int) -> None:
        """Add `value` (>= 0 for counters) to one labelled series."""
        spec = self._spec(name)
        if spec.kind == "counter" and value < 0:
            raise ValueError(f"counter {spec.name} cannot decrease (got {value})")
        key = _label_values(spec, labels)
        series = self._samples[spec.name]
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str | MetricSpec, value: float, **labels: str | int) -> None:
        """Set a gauge's labelled series to `value`."""
        spec = self._spec(name)
        if spec.kind != "gauge":
            raise ValueError(f"{spec.name} is a {spec.kind}; only gauges can be set")
        self._samples[spec.name][_label_values(spec, labels)] = value

    def value(self, name: str | MetricSpec, **labels: str | int) -> float:
        """The current value of one series (0 if never touched)."""
        spec = self._spec(name)
        return self._samples[spec.name].get(_label_values(spec, labels), 0.0)

    def set_callback(self, name: str | MetricSpec, callback: GaugeCallback) -> None:
        """Fill a metric at scrape time; its series are replaced by what the callback returns.

        Gauges, or counters whose source is itself a running total that never decreases
        (the usage ledger), so the database stays the one source of truth.
        """
        spec = self._spec(name)
        if len(spec.labels) > 1:
            raise ValueError(f"{spec.name}: callbacks fill metrics with at most one label")
        self._callbacks[spec.name] = callback

    async def refresh(self) -> None:
        """Run the scrape-time callbacks; one that fails leaves its gauge empty and is counted."""
        for name, callback in self._callbacks.items():
            spec = self._specs[name]
            try:
                samples = _callback_samples(spec, await callback())
            except Exception as exc:  # noqa: BLE001 - any failure: one gauge missing, not a 500
                # A stale number would look true; an absent one shows up as a gap.
                self._samples[name] = {}
                if CALLBACK_ERRORS.name in self._specs:
                    self.inc(CALLBACK_ERRORS, metric=name)
                log.warning("metrics_callback_failed", metric=name, error=str(exc))
                continue
            self._samples[name] = samples

    def render(self) -> str:
        """The text exposition format 0.0.4: HELP, TYPE, then sorted samples, per metric."""
        lines: list[str] = []
        for name, spec in self._specs.items():
            lines.append(f"# HELP {name} {_escape_help(spec.help)}")
            lines.append(f"# TYPE {name} {spec.kind}")
            for key, value in sorted(self._samples[name].items()):
                lines.append(f"{name}{_render_labels(spec.labels, key)} {_render_value(value)}")
        return "\n".join(lines) + "\n"

    def _spec(self, name: str | MetricSpec) -> MetricSpec:
        key = name.name if isinstance(name, MetricSpec) else name
        try:
            return self._specs[key]
        except KeyError:
            raise KeyError(f"metric {key} is not registered") from None


def batchd_registry() -> Registry:
    """A registry with batchd's metrics, token kinds at 0 so every series exists from start."""
    registry = Registry(BATCHD_METRICS)
    for kind in TOKEN_KINDS:
        registry.inc(TOKENS, 0, kind=kind)
    return registry


def _label_values(spec: MetricSpec, labels: Mapping[str, str | int]) -> _LabelValues:
    if set(labels) != set(spec.labels):
        raise ValueError(
            f"{spec.name} takes labels {list(spec.labels)}, got {sorted(labels)}",
        )
    return tuple(str(labels[label]) for label in spec.labels)


def _callback_samples(
    spec: MetricSpec, result: Mapping[str, float] | float
) -> dict[_LabelValues, float]:
    if isinstance(result, int | float):
        if spec.labels:
            raise ValueError(f"{spec.name} has a label: its callback must return a mapping")
        return {(): float(result)}
    if not spec.labels:
        raise ValueError(f"{spec.name} has no labels: its callback must return a number")
    return {(str(label),): float(value) for label, value in result.items()}


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(names: tuple[str, ...], values: _LabelValues) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label_value(value)}"' for name, value in zip(names, values, strict=True)
    )
    return "{" + pairs + "}"


def _render_value(value: float) -> str:
    value = float(value)  # an int slipped in by a caller has no is_integer() before 3.12
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        # Counts read better (and diff exactly) without a trailing ".0".
        return str(int(value))
    return repr(value)


# ---------------------------------------------------------------------------------------
# Health


@dataclass(frozen=True, slots=True)
class Health:
    """The daemon's health: healthy when there is no reason to think otherwise."""

    reasons: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.reasons


HealthCheck = Callable[[], Awaitable[Health]]


class ApiReachability:
    """Whether the API answered recently enough, for /healthz.

    An idle daemon makes no API calls, and that is not a fault: the API counts as
    unreachable only once calls have been failing, with no success since, for
    `max_silence_s` or longer.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing_since: float | None = None

    def record_success(self) -> None:
        """The API answered (any HTTP response that is not a 5xx)."""
        self._failing_since = None

    def record_failure(self) -> None:
        """A call got no answer: connection error, timeout or 5xx."""
        if self._failing_since is None:
            self._failing_since = self._clock()

    def problem(self, max_silence_s: float) -> str | None:
        """A reason for Health, or None when the API is (as far as we know) reachable."""
        if self._failing_since is None:
            return None
        failing_s = self._clock() - self._failing_since
        if failing_s < max_silence_s:
            return None
        return f"API unreachable for {failing_s:.0f} s"


def api_observer(
    registry: Registry, reachability: ApiReachability
) -> Callable[[str, int, float], None]:
    """An `on_response(endpoint, status, elapsed_s)` for BatchesClient: counts and liveness.

    The client reports status 0 when no complete response arrived (connection error or
    timeout). Any 4xx is the API answering; 5xx and no answer count against reachability.
    """

    def on_response(endpoint: str, status: int, elapsed_s: float) -> None:
        if status == 0:
            registry.inc(API_ERRORS, endpoint=endpoint, kind="connection")
            reachability.record_failure()
            return
        registry.inc(API_REQUESTS, endpoint=endpoint, status=status)
        if status >= 400:
            registry.inc(API_ERRORS, endpoint=endpoint, kind="http")
        if status >= 500:
            reachability.record_failure()
        else:
            reachability.record_success()

    return on_response


# ---------------------------------------------------------------------------------------
# HTTP listener


class MetricsServer:
    """Serves /metrics and /healthz on a local port; start() and stop() explicitly."""

    def __init__(
        self,
        registry: Registry,
        health: HealthCheck,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_timeout_s: float = 5.0,
    ) -> None:
        self._registry = registry
        self._health = health
        self._host = host
        self._requested_port = port
        self._health_timeout_s = health_timeout_s
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0); only after start()."""
        if self._port is None:
            raise RuntimeError("MetricsServer is not started")
        return self._port

    async def start(self) -> None:
        """Bind and serve; raises OSError if the address is taken."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        # No access log: a scrape every 15 s would drown the daemon's own events.
        # A short shutdown timeout: a scrape in flight must not hold up the daemon's stop.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("metrics_listening", host=self._host, port=self._port)

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._registry.refresh()
        return web.Response(
            body=self._registry.render().encode("utf-8"),
            headers={"Content-Type": CONTENT_TYPE},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            health = await asyncio.wait_for(self._health(), self._health_timeout_s)
        except TimeoutError:
            health = Health((f"health check did not answer within {self._health_timeout_s} s",))
        except Exception as exc:  # noqa: BLE001 - a failing check is itself the answer: 503
            log.warning("health_check_failed", error=str(exc), error_type=type(exc).__name__)
            health = Health((f"health check failed: {type(exc).__name__}",))
        if health.healthy:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="".join(f"{r}\n" for r in health.reasons))
