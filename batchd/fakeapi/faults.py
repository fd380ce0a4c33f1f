"""Fault injection for the fake API: all off by default, every decision seeded.

Two kinds of faults:

- per-request fates decided at create (`errored` with a retryable or non-retryable
  error type, `expired`), rendered later as result lines (spec §4, §4.1);
- HTTP faults decided per call on chosen endpoints (429 with retry-after, 5xx, 529,
  a dropped connection, create-then-drop, a create dropped at once and committed
  later, a results stream cut off midway, a slow response), plus an "API down" switch,
  a transient 404 just after create (§7.6) and a list that shows new batches late.

The real API promises no idempotency on create (§6.4) and says nothing of when a new
batch shows on the list: `commit_drop`, `late_create` and `list_lag_seconds` are how a
client's reconcile (§8.3) meets a batch it did not hear of, or does not see yet.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Literal, get_args

Endpoint = Literal["create", "retrieve", "list", "cancel", "delete", "results"]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)

# "commit_drop" and "late_create" apply to create only, "truncate" to results only; the
# others anywhere. "late_create": the connection is dropped once the body is read, and the
# batch is committed `late_create_seconds` later (the client never hears of it).
FaultKind = Literal[
    "429", "500", "503", "504", "529", "drop", "commit_drop", "late_create", "truncate", "slow"
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
DEFAULT_FAULT_KINDS: tuple[FaultKind, ...] = ("429", "500", "529", "drop")

DownMode = Literal["503", "drop"]

# §6.1: the error type the real API puts in the body for each injected status.
STATUS_ERROR_TYPES: dict[FaultKind, tuple[int, str, str]] = {
    "429": (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    "500": (500, "api_error", "Internal server error"),
    "503": (503, "api_error", "Service unavailable"),
    "504": (504, "timeout_error", "Request timeout"),
    "529": (529, "overloaded_error", "Overloaded"),
}

# Per-request errors injected at "execution" time (§4.1, §8.9): the first two are
# retryable as they are, the last one means "fix the request first".
RETRYABLE_REQUEST_ERRORS: tuple[tuple[str, str], ...] = (
    ("api_error", "Internal server error"),
    ("overloaded_error", "Overloaded"),
)
NON_RETRYABLE_REQUEST_ERROR = (
    "invalid_request_error",
    "fake-api injected error: this request is invalid and must be fixed before retrying",
)


@dataclass(frozen=True)
class FaultConfig:
    """What to inject; every rate is a probability in [0, 1]. All off by default."""

    # Per-request fates (decided at create, seen in the results).
    error_rate: float = 0.0
    retryable_error_share: float = 0.5
    expire_rate: float = 0.0
    # HTTP faults: each call to a chosen endpoint fails with this probability, with a
    # kind drawn uniformly from the kinds that apply to that endpoint.
    http_fault_rate: float = 0.0
    http_fault_kinds: tuple[FaultKind, ...] = DEFAULT_FAULT_KINDS
    http_fault_endpoints: tuple[Endpoint, ...] = ENDPOINTS
    retry_after_seconds: float = 1.0
    slow_seconds: float = 2.0
    # Real seconds from the dropped connection of a `late_create` to its batch's commit.
    late_create_seconds: float = 5.0
    # At most this many HTTP faults are drawn under this configuration (0: no limit):
    # "the next create is dropped, the ones after succeed" without racing the client.
    http_fault_limit: int = 0
    # `x-should-retry` on injected error responses: None sends no header (§6.3).
    should_retry: bool | None = None
    # Independent of the above: a results stream cut off midway, at this rate.
    results_truncate_rate: float = 0.0
    # §7.6: retrieve answers 404 for this long after a batch's creation (0 = off).
    not_found_after_create_seconds: float = 0.0
    # The list endpoint shows a batch only once it is this old, by the fake's clock
    # (0 = off); retrieve by id answers at once. The API promises no read-after-write.
    list_lag_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "error_rate",
            "retryable_error_share",
            "expire_rate",
            "http_fault_rate",
            "results_truncate_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("late_create_seconds", "list_lag_seconds", "http_fault_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.error_rate + self.expire_rate > 1.0:
            raise ValueError("error_rate + expire_rate must not exceed 1")
        for kind in self.http_fault_kinds:
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        for endpoint in self.http_fault_endpoints:
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")

    @classmethod
    def from_json(cls, body: dict[str, object]) -> FaultConfig:
        """Build from the JSON of `POST /_fake/faults`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(unknown)}")
        values: dict[str, object] = dict(body)
        if "http_fault_kinds" in values:
            values["http_fault_kinds"] = tuple(parse_names(values["http_fault_kinds"], FAULT_KINDS))
        if "http_fault_endpoints" in values:
            values["http_fault_endpoints"] = tuple(
                parse_names(values["http_fault_endpoints"], ENDPOINTS)
            )
        return cls(**values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_names(value: object, every: tuple[str, ...]) -> list[str]:
    """A comma list or a JSON list of names; "all" means every name in `every`."""
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, list | tuple):
        names = [str(name) for name in value]
    else:
        raise TypeError(f"expected a list of names, got {value!r}")
    cleaned = [name.strip() for name in names if name.strip()]
    if cleaned == ["all"]:
        return list(every)
    return cleaned


RequestFate = Literal["succeeded", "errored", "expired"]


def draw_request_fate(
    rng: random.Random, config: FaultConfig
) -> tuple[RequestFate, tuple[str, str] | None]:
    """The injected fate of one request, and its error (type, message) when errored.

    An injected `expired` request reports `expired` when the batch ends normally, not
    only at `expires_at` as on the real API: tests see expired lines without waiting for
    an expiry (set a short `expiry_seconds` to exercise the real path).
    """
    if config.error_rate == 0.0 and config.expire_rate == 0.0:
        return "succeeded", None
    roll = rng.random()
    if roll < config.error_rate:
        if rng.random() < config.retryable_error_share:
            return "errored", rng.choice(RETRYABLE_REQUEST_ERRORS)
        return "errored", NON_RETRYABLE_REQUEST_ERROR
    if roll < config.error_rate + config.expire_rate:
        return "expired", None
    return "succeeded", None


@dataclass
class FaultInjector:
    """The run-time fault switchboard: replace `config` at any time."""

    config: FaultConfig = field(default_factory=FaultConfig)
    seed: int | None = None
    down_until: datetime | None = None
    down_mode: DownMode = "503"
    injected: Counter[str] = field(default_factory=Counter)
    # Calls refused while down, by "METHOD /path": one path is one caller's retry chain
    # (a batch's poll, say), so a test can see each caller's backoff, not only a total.
    down_calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        # HTTP faults drawn under `_limited` (the config object they were drawn under):
        # replacing the config starts `http_fault_limit` afresh.
        self._limited: FaultConfig | None = None
        self._drawn = 0

    def go_down(self, now: datetime, seconds: float, mode: DownMode = "503") -> None:
        """Every API endpoint fails until `now + seconds` (of the fake's clock)."""
        self.down_until = now + timedelta(seconds=seconds)
        self.down_mode = mode

    def is_down(self, now: datetime) -> bool:
        return self.down_until is not None and now < self.down_until

    def draw_http_fault(self, endpoint: Endpoint) -> FaultKind | None:
        """The fault to inject into this call, if any."""
        config = self.config
        if config.http_fault_rate == 0.0 or endpoint not in config.http_fault_endpoints:
            return None
        if self._limited is not config:
            self._limited, self._drawn = config, 0
        if config.http_fault_limit and self._drawn >= config.http_fault_limit:
            return None
        kinds = [kind for kind in config.http_fault_kinds if _applies(kind, endpoint)]
        if not kinds or self._rng.random() >= config.http_fault_rate:
            return None
        self._drawn += 1
        return self._rng.choice(kinds)

    def draw_truncation(self) -> bool:
        rate = self.config.results_truncate_rate
        return rate > 0.0 and self._rng.random() < rate

    def record(self, kind: str) -> None:
        self.injected[kind] += 1

    def record_down(self, method: str, path: str) -> None:
        self.injected["down"] += 1
        self.down_calls[f"{method} {path}"] += 1


def _applies(kind: FaultKind, endpoint: Endpoint) -> bool:
    if kind in ("commit_drop", "late_create"):
        return endpoint == "create"
    if kind == "truncate":
        return endpoint == "results"
    return True
