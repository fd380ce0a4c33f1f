"""When to retry a failed API call and how long to wait first (spec §6.3).

`retry-after`/`retry-after-ms` and `x-should-retry` are read here; the loop that sleeps
and tries again is the client's.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from batchd.api.errors import ApiConnectionError, ApiError, ApiStatusError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The SDKs' retry rules (spec §6.3), with more retries and long `retry-after` honoured."""

    max_retries: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # The daemon has no deadline, so a long retry-after is obeyed (the Python SDK ignores
    # values over 60 s and retries sooner, only to be refused again) up to this bound.
    max_retry_after_s: float = 900.0

    def should_retry(self, error: ApiError) -> bool:
        """Connection faults, 408, 409, 429 and 5xx; `x-should-retry` overrides the status."""
        if isinstance(error, ApiConnectionError):
            return True
        if not isinstance(error, ApiStatusError):
            return False
        if error.should_retry is not None:
            return error.should_retry
        return error.status in (408, 409, 429) or error.status >= 500

    def delay_s(self, retries_done: int, retry_after_s: float | None, rng: random.Random) -> float:
        """The server's wait if it gave one, else `min(base*2**n, max) * U(0.75, 1]`."""
        if retry_after_s is not None and retry_after_s > 0:
            return min(retry_after_s, self.max_retry_after_s)
        backoff = min(self.base_delay_s * 2.0**retries_done, self.max_delay_s)
        return backoff * (1 - 0.25 * rng.random())


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait per `retry-after-ms`, then `retry-after` as seconds or HTTP-date."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return None


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The server's `x-should-retry` verdict, or None when it gave none (or gibberish)."""
    value = headers.get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)
