"""The API key, checked at start with one cheap call, so a wrong key is not noticed hours
later when the first task arrives (an empty queue makes no other call)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum

import structlog

from batchd.api import ApiError, AuthenticationError, BatchesClient
from batchd.service.exits import EXIT_CONFIG

log = structlog.get_logger("batchd.service.keycheck")

# The check at start waits this long for an answer (the client retries transport faults
# within it, logged as `api_retry`); past it the daemon starts anyway and checks again in
# the background, every RECHECK_S doubling up to RECHECK_MAX_S, until the API answers.
START_WAIT_S = 5.0
RECHECK_S = 15.0
RECHECK_MAX_S = 300.0


class KeyState(StrEnum):
    OK = "ok"  # the API accepted it
    REFUSED = "refused"  # 401/403: the daemon stops with EXIT_CONFIG
    UNCHECKED = "unchecked"  # no answer yet (starting, or the API is unreachable)


class ApiKeyCheck:
    """Lists one batch (`limit=1`): the cheapest call that needs a valid key."""

    def __init__(
        self,
        source: str,
        *,
        start_wait_s: float = START_WAIT_S,
        recheck_s: float = RECHECK_S,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.source = source  # where the key came from (a variable's name, a path): never it
        self.state = KeyState.UNCHECKED
        self._start_wait_s = start_wait_s
        self._recheck_s = recheck_s
        self._sleep = sleep

    async def verify(self, client: BatchesClient) -> KeyState:
        """One check, bounded by the start wait; logs what it found."""
        try:
            # A read: abandoning it at the timeout is harmless.
            await asyncio.wait_for(client.list_page(limit=1), self._start_wait_s)
        except AuthenticationError as exc:
            self.state = KeyState.REFUSED
            # A refused key is not a crash: no traceback wanted.
            log.error("api_key_refused", key_source=self.source, error=str(exc))  # noqa: TRY400
        except (ApiError, TimeoutError) as exc:
            log.warning(
                "api_key_unchecked",
                key_source=self.source,
                error=str(exc) or f"no answer within {self._start_wait_s} s",
                error_type=type(exc).__name__,
            )
        else:
            self.state = KeyState.OK
            log.info("api_key_accepted", key_source=self.source)
        return self.state

    async def recheck(self, client: BatchesClient, stop: Callable[[int], None]) -> None:
        """While unchecked: check again with a growing delay; a refusal stops the daemon."""
        delay = self._recheck_s
        while self.state is KeyState.UNCHECKED:
            log.info("api_key_check_retry", retry_in_s=delay)
            await self._sleep(delay)
            delay = min(delay * 2, RECHECK_MAX_S)
            if await self.verify(client) is KeyState.REFUSED:
                stop(EXIT_CONFIG)

    def health_note(self) -> str:
        """The key's state for /healthz, healthy or not (never the key itself)."""
        return f"api key: {self.state} (from {self.source})"

    def health_problem(self) -> str | None:
        """A reason for /healthz when the key was refused."""
        if self.state is KeyState.REFUSED:
            return f"api key refused by the API (key from {self.source})"
        return None
