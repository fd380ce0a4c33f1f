"""A database outage as the daemon lives through it: wait with backoff, say so once in the
logs, in /healthz and in systemd's STATUS, and say when it is over.

Only errors the store marks `retryable` (a PostgreSQL server restarting or unreachable)
count: every step's write is one transaction that either committed or left nothing, so
waiting and doing the step again is always right, and no task fails for the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from batchd.service.notify import Notifier
from batchd.store import StoreError

log = structlog.get_logger("batchd.service.outage")
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0


class Outage:
    """Whether the database is unavailable, since when, and how long to wait next."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._since: float | None = None
        self._error = ""

    def problem(self) -> str | None:
        """For /healthz: None while the database answers."""
        if self._since is None:
            return None
        return f"database unavailable for {time.monotonic() - self._since:.0f} s: {self._error}"

    async def wait_out(self, step: str, exc: StoreError, stop: asyncio.Event) -> None:
        """Note the failure (logged once per outage) and wait: the longer the outage, the
        longer between tries (half its age, 0.5 s to 10 s), so a down server is not
        hammered by every loop; returns early when the daemon stops."""
        now = time.monotonic()
        self._error = str(exc)
        if self._since is None:
            self._since = now
            log.warning("database_unavailable", step=step, error=self._error)
            self._notifier.status(f"waiting for the database: {self._error}")
        else:
            log.debug("database_still_unavailable", step=step, error=self._error)
        wait = min(MAX_WAIT_S, max(FIRST_WAIT_S, (now - self._since) / 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)

    def over(self) -> None:
        """A step reached the database again."""
        if self._since is None:
            return
        log.info("database_available_again", after_s=round(time.monotonic() - self._since, 1))
        self._notifier.status("database available again")
        self._since = None
