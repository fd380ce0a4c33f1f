"""The daemon's health for /healthz, and what API responses say about it (and the metrics)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchd.service.metrics import API_ERRORS, API_REQUESTS, LAST_POLL, Registry

# The client's name for a poll: GET one batch (spec §1.2).
POLL_ENDPOINT = "retrieve"


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
    registry: Registry,
    reachability: ApiReachability,
    wall_clock: Callable[[], float] = time.time,
) -> Callable[[str, int, float], None]:
    """An `on_response(endpoint, status, elapsed_s)` for BatchesClient: counts and liveness.

    The client reports status 0 when no complete response arrived (connection error or
    timeout). Any 4xx is the API answering; 5xx and no answer count against reachability.
    A poll answered 2xx moves the last-successful-poll time, which starts at the daemon's
    start so that "no poll for N minutes" counts from there.
    """
    registry.set(LAST_POLL, wall_clock())

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
        if endpoint == POLL_ENDPOINT and 200 <= status < 300:
            registry.set(LAST_POLL, wall_clock())

    return on_response
