"""`batchd run --exit-when-idle`: the daemon, with its progress shown alongside it.

A bar on a terminal, a `progress` log line every few seconds otherwise. What is shown is
read from the database (a reader of its own) and from the `DaemonState` the daemon
publishes; nothing here reaches into the daemon's components.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from batchd.cli.commands import status_snapshot
from batchd.cli.progress import (
    ProgressBar,
    ProgressSnapshot,
    RateMeter,
    eta_s,
    progress_snapshot,
    render_bar,
    terminal_columns,
)
from batchd.config import Config
from batchd.domain import TaskStatus
from batchd.service.daemon import Daemon, run_daemon
from batchd.service.exits import EXIT_TEMPFAIL
from batchd.store import Store, StoreError, open_store

log = structlog.get_logger("batchd.cli.progress")

# sysexits.h EX_TEMPFAIL: work remains, and the budget lets none of it go before the
# period rolls over or the budget is raised; running again later is the remedy.
EXIT_BUDGET_PAUSED = EXIT_TEMPFAIL


@dataclass(frozen=True, slots=True)
class RunView:
    """How a run shows its progress: a bar, or a log line every `log_every_s`."""

    progress_bar: ProgressBar | None
    tick_s: float = 0.5
    log_every_s: float = 10.0


async def run_with_progress(config: Config, api_key: str, view: RunView) -> int:
    """`run_daemon(exit_when_idle=True)` with its progress followed alongside it."""
    followers: list[_Follower] = []

    async def started(daemon: Daemon) -> None:
        follower = _Follower(daemon, config, view)
        await follower.start()
        followers.append(follower)
        # The last bar or line is drawn once the loops are done, before `daemon_stopped`.
        daemon.add_shutdown_step(follower.finish)

    try:
        return await run_daemon(config, api_key, exit_when_idle=True, on_started=started)
    finally:
        for follower in followers:
            await follower.close()


class _Follower:
    def __init__(self, daemon: Daemon, config: Config, view: RunView) -> None:
        self._daemon = daemon
        self._config = config
        self._view = view
        self._stop = asyncio.Event()
        self._meter = RateMeter()
        self._logged_at: float | None = None
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._store = await open_store(self._config.database, read_only=True)  # reads only
        self._task = asyncio.create_task(self._follow(), name="progress")

    async def _follow(self) -> None:
        while not self._stop.is_set():
            snapshot = await self._read()
            if snapshot is not None:
                self._show(snapshot, final=False)
                await self._stop_if_budget_blocks(snapshot)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._view.tick_s)

    async def finish(self) -> None:
        """Stop following and show the final figures."""
        await self._halt()
        if (snapshot := await self._read()) is not None:
            self._show(snapshot, final=True)

    async def close(self) -> None:
        await self._halt()
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    async def _halt(self) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    def _show(self, snapshot: ProgressSnapshot, *, final: bool) -> None:
        now = time.monotonic()
        self._meter.add(now, snapshot.done)
        progress_bar = self._view.progress_bar
        if progress_bar is not None:
            progress_bar.update(render_bar(snapshot, self._meter.rate(), terminal_columns()))
            if final:
                progress_bar.finish()
        elif final or self._logged_at is None or now - self._logged_at >= self._view.log_every_s:
            _log_progress(snapshot, self._meter.rate())
            self._logged_at = now

    async def _read(self) -> ProgressSnapshot | None:
        if self._store is None:
            return None
        try:
            status = await status_snapshot(self._store, accounting=False)
        except StoreError as exc:
            # The progress display must never stop the run: skip this tick.
            log.warning("progress_read_failed", error=str(exc))
            return None
        paused = self._daemon.state().paused_reason
        alerts = ("paused: budget",) if paused else ()
        return progress_snapshot(status, datetime.now(UTC), alerts)

    async def _stop_if_budget_blocks(self, snapshot: ProgressSnapshot) -> None:
        """exit-when-idle with work left that the budget holds back and nothing in flight:
        nothing more can happen in this run, so end it rather than wait for a new period."""
        state = self._daemon.state()
        if state.stopping or state.paused_reason is None or snapshot.batches:
            return
        if snapshot.tasks.get(TaskStatus.SUBMITTED, 0):
            return
        fresh = await self._daemon.fresh_paused_reason()
        if fresh is not None:
            log.warning("daemon_stopping_budget_paused", reason=fresh)
            self._daemon.stop(EXIT_BUDGET_PAUSED)


def _log_progress(snapshot: ProgressSnapshot, rate: float | None) -> None:
    log.info(
        "progress",
        done=snapshot.done,
        total=snapshot.total,
        pending=snapshot.tasks.get(TaskStatus.PENDING, 0),
        submitted=snapshot.tasks.get(TaskStatus.SUBMITTED, 0),
        processed_by_api=snapshot.processed_at_api,
        batches_in_flight=len(snapshot.batches),
        rate_per_s=None if rate is None else round(rate, 2),
        eta_s=_rounded(eta_s(snapshot.remaining, rate)),
        paused=snapshot.alerts[0] if snapshot.alerts else None,
    )


def _rounded(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds)
