"""The daemon: its loops, signals and shutdown. Every background task is supervised."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import aiohttp
import structlog

from batchd.api import ApiError, AuthenticationError, BatchesClient, RetryPolicy
from batchd.config import BudgetSettings, CollectorSettings, Config, api_key_source
from batchd.domain import FINAL_TASK_STATUSES, IN_FLIGHT_BATCH_STATES, TaskStatus
from batchd.money.budget import BudgetGate
from batchd.pipeline.cancels import Canceler
from batchd.pipeline.collector import Collector
from batchd.pipeline.poller import Poller
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import AuthenticationFailed, Submitter
from batchd.service.exits import EXIT_CONFIG, TemporaryError
from batchd.service.gauges import register_database_gauges
from batchd.service.health import ApiReachability, Health, api_observer
from batchd.service.idle import all_work_done
from batchd.service.instancelock import AlreadyRunningError, daemon_lock
from batchd.service.keycheck import ApiKeyCheck, KeyState
from batchd.service.metrics import (
    BATCHES_CREATED,
    REQUESTS_SUBMITTED,
    RETRIES,
    Registry,
    batchd_registry,
)
from batchd.service.notify import Notifier
from batchd.service.outage import Outage
from batchd.service.roles import STANDBY_WORK, Role
from batchd.service.status import status_snapshot
from batchd.service.web.server import MetricsServer
from batchd.store import Store, StoreError, open_store
from batchd.store.interface import Leadership

log = structlog.get_logger("batchd.service.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
# EX_CONFIG from sysexits.h: the unit file tells systemd not to restart on it, since a
# restart cannot fix a refused key.
EXIT_AUTH = EXIT_CONFIG

# /healthz fails when the API has failed with no success for this long.
API_SILENCE_S = 300.0
# The watchdog's database probe: a read that takes longer than this means we are wedged.
PROBE_TIMEOUT_S = 10.0
STATUS_INTERVAL_S = 10.0
_LOOPS = frozenset({"submitter", "poller", "collector"})

Clock = Callable[[], datetime]
T = TypeVar("T")
StatusListener = Callable[[str], object]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class DaemonState:
    """What the daemon publishes for displays (the progress bar), read without reaching in."""

    paused_reason: str | None  # the budget holds submission back, and why
    stopping: bool


class Daemon:
    """Submits, polls and collects until stopped (or, with exit_when_idle, until done)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        client: BatchesClient,
        *,
        exit_when_idle: bool = False,
        clock: Clock = utc_now,
        on_status: StatusListener | None = None,
        notifier: Notifier | None = None,
        registry: Registry | None = None,
        reachability: ApiReachability | None = None,
        key_check: ApiKeyCheck | None = None,
    ) -> None:
        self._config = config
        self._client = client
        self.key_check = key_check or ApiKeyCheck(api_key_source(config) or "unknown")
        # Awaited after the loops are drained, before `daemon_stopped` is logged.
        self._shutdown_steps: list[Callable[[], Awaitable[None]]] = []
        self._store = store
        self._exit_when_idle = exit_when_idle
        self._clock = clock
        self._on_status = on_status
        self._stop = asyncio.Event()
        self._wake_submitter = asyncio.Event()
        self._wake_poller = asyncio.Event()
        self._wake_collector = asyncio.Event()
        self._exit_code = EXIT_OK
        self._tasks: set[asyncio.Task[None]] = set()
        # Helpers (watchdog, status) are not drained: cancelled once the loops are done.
        self._aux: set[asyncio.Task[None]] = set()
        self.notifier = notifier or Notifier(None)
        self._outage = Outage(self.notifier)
        self._lead: Leadership | None = None
        self._loops_started = False  # not while standing by for the leader lock
        self.registry = registry or batchd_registry()
        self.reachability = reachability or ApiReachability()
        self.metrics_port: int | None = None  # set once the metrics listener is bound
        # Each component gets its own section of the config (or, reading several, its
        # settings object from batchd/config.py), its collaborators, and the clock.
        budget_settings = BudgetSettings.of(config)
        budget = (
            None if budget_settings is None else BudgetGate(store, budget_settings, clock=clock)
        )
        self.reconciler = Reconciler(
            store, client, config.batching, clock=clock, registry=self.registry
        )
        self.canceler = Canceler(store, client)
        self.submitter = Submitter(
            store,
            client,
            config.batching,
            reconciler=self.reconciler,
            monotonic=time.monotonic,
            budget=budget,
        )
        self.poller = Poller(store, client, config.polling, clock=clock)
        self.collector = Collector(
            store, client, CollectorSettings.of(config), clock=clock, registry=self.registry
        )
        self.role = Role(
            self.registry, self.collector.holder, shared=config.database.url is not None
        )

    def state(self) -> DaemonState:
        """The budget's pause (as last seen) and whether the daemon is stopping."""
        budget = self.submitter.budget
        return DaemonState(budget.paused_reason if budget else None, self._stop.is_set())

    async def fresh_paused_reason(self) -> str | None:
        """The budget's pause read now (the gate's own answer may predate a result)."""
        budget = self.submitter.budget
        return None if budget is None else (await budget.view()).paused_reason

    def add_shutdown_step(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` once the loops are done, before `daemon_stopped` is logged."""
        self._shutdown_steps.append(step)

    def stop(self, exit_code: int = EXIT_OK) -> None:
        """Stop taking new work; loops finish the step in hand and return."""
        if not self._stop.is_set():
            log.info("daemon_stopping", exit_code=exit_code)
            self.notifier.stopping()
            self.notifier.status("stopping: finishing the step in hand")
        self._exit_code = max(self._exit_code, exit_code)
        self._stop.set()
        for event in (self._wake_submitter, self._wake_poller, self._wake_collector):
            event.set()

    async def run(self, shutdown_timeout_s: float = 20.0) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        stack = contextlib.AsyncExitStack()
        try:
            log.info(
                "daemon_started", exit_when_idle=self._exit_when_idle, instance=self.role.instance
            )
            # Try to lead (PostgreSQL: another daemon may; this one stands by meanwhile and
            # polls and collects, and submits once the leader dies: `_lead_and_submit`).
            self._lead = await stack.enter_async_context(
                self._store.leadership(self._stop, self._standing_by)
            )
            self.role.leadership = self._lead
            # The key first: a refused one ends the start (exit 78) before any work.
            if await self.key_check.verify(self._client) is KeyState.REFUSED:
                self.stop(EXIT_AUTH)
            else:
                self._start_loops()
                self.notifier.ready()  # the store was opened and migrated before run()
            await self._stop.wait()
            await self._drain(shutdown_timeout_s)
        except asyncio.CancelledError:
            self.stop()
            await self._drain(0)
            raise
        finally:
            await stack.aclose()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            for task in self._aux:
                task.cancel()
            await asyncio.gather(*self._aux, return_exceptions=True)
        for step in self._shutdown_steps:
            await step()
        log.info("daemon_stopped", exit_code=self._exit_code)
        return self._exit_code

    def _standing_by(self, text: str) -> None:
        self.role.standing_by = True
        self._start_watchdog()
        self._status_said(f"{text}; this one {STANDBY_WORK}")

    def _start_watchdog(self) -> None:
        if "watchdog" not in {t.get_name() for t in self._aux}:
            self._spawn("watchdog", lambda: self.notifier.watchdog_loop(self.alive), auxiliary=True)

    def _start_loops(self) -> None:
        self._loops_started = True
        self._start_watchdog()
        self._spawn("submitter", self._lead_and_submit)
        self._spawn("poller", self._poll_loop)
        self._spawn("collector", self._collect_loop)
        if self._exit_when_idle:
            self._spawn("idle_watch", self._idle_loop)
        self._spawn("status", self._status_loop, auxiliary=True)
        if self.key_check.state is KeyState.UNCHECKED:
            check = self.key_check
            self._spawn(
                "api_key_check", lambda: check.recheck(self._client, self.stop), auxiliary=True
            )

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            raise SystemExit(EXIT_FAILURE)
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop()

    def _spawn(
        self, name: str, loop_fn: Callable[[], Awaitable[None]], *, auxiliary: bool = False
    ) -> None:
        """Start a supervised task; auxiliary ones are cancelled, not drained, at the end."""
        tasks = self._aux if auxiliary else self._tasks
        task = asyncio.create_task(self._supervised(name, loop_fn), name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def alive(self) -> bool:
        """The watchdog's probe: every loop still running and the database answering."""
        running = {t.get_name() for t in self._tasks}
        if not self._stop.is_set() and self._loops_started and not running >= _LOOPS:
            return False
        try:
            # A read: abandoning it at the timeout is harmless.
            await asyncio.wait_for(self._store.status_counts(), PROBE_TIMEOUT_S)
        except TimeoutError:
            return False
        except StoreError as exc:
            return exc.retryable  # an outage is waited out: a restart would not help
        return True

    async def health(self) -> Health:
        """What /healthz reports; answering at all proves the event loop turns."""
        reasons = []
        if missing := _LOOPS - {t.get_name() for t in self._tasks}:
            reasons.append(f"loops not running: {', '.join(sorted(missing))}")
        try:
            await asyncio.wait_for(self._store.status_counts(), PROBE_TIMEOUT_S)
        except (TimeoutError, StoreError):
            reasons.append("database not answering")
        if problem := self._outage.problem():
            reasons.append(problem)
        if problem := self.reachability.problem(API_SILENCE_S):
            reasons.append(problem)
        if problem := self.key_check.health_problem():
            reasons.append(problem)
        notes = (self.key_check.health_note(), self.role.health_note())
        return Health(tuple(reasons), notes=tuple(note for note in notes if note is not None))

    async def _status_loop(self) -> None:
        while True:
            await self._guarded("status", self._publish_status, None)
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _publish_status(self) -> None:
        if self._outage.problem():
            return  # the outage's own STATUS stays until a step succeeds again
        counts = await self._store.status_counts()
        in_flight = len(await self._store.batches_in(*IN_FLIGHT_BATCH_STATES))
        done = sum(counts[status] for status in FINAL_TASK_STATUSES)
        text = (
            f"{self.role.status_prefix()}{counts[TaskStatus.PENDING]:,} pending, "
            f"{in_flight:,} batches in flight, {done:,} done"
        )
        budget = self.submitter.budget
        if budget is not None and budget.paused_reason:
            text += f"; paused: budget ({budget.paused_reason})"
        self._status_said(text)

    def _status_said(self, text: str) -> None:
        self.notifier.status(text)
        if self._on_status is not None:
            self._on_status(text)

    async def _supervised(self, name: str, loop_fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await loop_fn()
        except asyncio.CancelledError:
            raise
        except AuthenticationFailed:
            self.stop(EXIT_AUTH)
        except Exception:
            # A loop that dies would leave work silently undone: stop the daemon loudly.
            log.exception("loop_crashed", loop=name)
            self.stop(EXIT_FAILURE)

    async def _drain(self, timeout_s: float) -> None:
        """Give loops time to finish their step; then cancel (store writes are shielded)."""
        if not self._tasks:
            return
        _, still_running = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in still_running:
            task.cancel()
        if still_running:
            log.warning("loops_cancelled", loops=sorted(t.get_name() for t in still_running))
            await asyncio.wait(still_running)

    async def _pause(self, wake: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=seconds)
        wake.clear()

    async def _lead_and_submit(self) -> None:
        """The leader's work (SQLite: at once); new tasks wake it (PostgreSQL: LISTEN)."""
        assert self._lead is not None
        if not await self._lead.acquired():
            return  # stopped while standing by
        log.info("leading", instance=self.role.instance)
        await self._guarded("status", self._publish_status, None)  # no longer "standby"
        async with self._store.listen_for_tasks(self._wake_submitter.set):
            await self._submit_loop()

    async def _submit_loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            await self._pause(self._wake_submitter, delay)
            if self._stop.is_set():
                return
            delay = await self._guarded(
                "submit", self._submit_step, self._config.polling.interval_s
            )

    async def _submit_step(self) -> float:
        if self._lead is not None and not self._lead.leading:
            return 1.0  # lost the lock: claims would fail, reconciling is the leader's
        await self.canceler.cancel_requested()
        for batch in await self.reconciler.creating_batches():
            await self.reconciler.reconcile(batch)
        if await self.reconciler.creating_batches():
            # One unresolved create at a time, so reconciliation can never confuse two.
            return min(2.0, self._config.polling.interval_s)
        if await self.reconciler.watch():
            self._wake_poller.set()  # a late batch found: poll it, harvest it when it ends
        result = await self.submitter.submit_once()
        if result.created:
            self.registry.inc(BATCHES_CREATED, result.created)
            self.registry.inc(REQUESTS_SUBMITTED, result.requests)
            self._wake_poller.set()
            self._wake_collector.set()  # a create may answer `ended` (the fake, processing 0)
            return 0.0
        if result.retry_after_s is not None:
            return result.retry_after_s
        return min(1.0, max(0.05, self._config.batching.linger_s / 4)) if result.waiting else 1.0

    async def _poll_loop(self) -> None:
        while not self._stop.is_set():
            report = await self._guarded("poll", self.poller.poll_all, None)
            if report is not None and report.ended:
                self._wake_collector.set()
            await self._pause(self._wake_poller, self._config.polling.interval_s)

    async def _collect_loop(self) -> None:
        collect = lambda: self.collector.collect_all(self._wake_collector)  # noqa: E731
        async with self._store.collector_liveness(self.collector.holder):
            while not self._stop.is_set():
                if await self._guarded("collect", collect, 0):
                    self._wake_submitter.set()
                await self._pause(self._wake_collector, self._config.polling.interval_s)

    async def _idle_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.2)
            # Guarded: an outage is waited out (a fault here once ended the daemon with 1).
            done = lambda: all_work_done(self._store, self._clock())  # noqa: E731
            if await self._guarded("idle_check", done, False):
                log.info("daemon_idle")
                self.stop(EXIT_OK)

    async def _guarded(self, step: str, fn: Callable[[], Awaitable[T]], fallback: T) -> T:
        """Run one step; API and database faults are logged and retried, never fatal."""
        try:
            result = await fn()
        except AuthenticationError as exc:
            # Every later call would be refused too: stop (exit 78) instead of looping.
            # A refused key is not a crash: no traceback wanted.
            log.error("authentication_failed", step=step, error=str(exc))  # noqa: TRY400
            raise AuthenticationFailed(str(exc)) from exc
        except StoreError as exc:
            if not exc.retryable:
                log.warning("step_failed", step=step, error=str(exc), error_type="StoreError")
                return fallback
            await self._outage.wait_out(step, exc, self._stop)
            return fallback
        except ApiError as exc:
            log.warning("step_failed", step=step, error=str(exc), error_type=type(exc).__name__)
            return fallback
        self._outage.over()
        return result


async def run_daemon(
    config: Config,
    api_key: str,
    *,
    exit_when_idle: bool = False,
    on_started: Callable[[Daemon], Awaitable[None]] | None = None,
) -> int:
    """Open the database and the HTTP session, run the daemon, close both in reverse."""
    async with contextlib.AsyncExitStack() as stack:
        notifier = Notifier.from_environment()
        stack.callback(notifier.close)
        # The lock before the open (a second daemon must not migrate the schema under a
        # running one) and released after the close (the exit stack unwinds in reverse).
        # SQLite only: on PostgreSQL daemons on any hosts share the database (the store
        # coordinates them), and the file `path` names is not used at all.
        if config.database.url is None:
            try:
                stack.enter_context(daemon_lock(config.database.path))
            except AlreadyRunningError:
                raise
            except StoreError:
                # The directory refuses the lock file: opening the database says more
                # precisely why (read-only, missing, ...), so that error is the one raised.
                await (await open_store(config.database, migrate=False)).close()
                raise
        store = await open_store(config.database)
        stack.push_async_callback(store.close)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        registry, reachability = batchd_registry(), ApiReachability()
        client = BatchesClient(
            session,
            base_url=config.api.base_url,
            api_key=api_key,
            policy=RetryPolicy(max_retries=config.api.max_retries),
            control_timeout_s=config.api.request_timeout_s,
            on_response=api_observer(registry, reachability),
            on_retry=lambda endpoint: registry.inc(RETRIES, endpoint=endpoint),
        )
        daemon = Daemon(
            config,
            store,
            client,
            exit_when_idle=exit_when_idle,
            notifier=notifier,
            registry=registry,
            reachability=reachability,
        )
        budget = daemon.submitter.budget
        register_database_gauges(
            registry,
            store,
            config,
            utc_now,
            budget_paused=lambda: budget is not None and budget.paused_reason is not None,
        )
        if config.metrics.enabled:
            server = MetricsServer(
                registry,
                daemon.health,
                status=lambda: status_snapshot(store, config),
                host=config.metrics.host,
                port=config.metrics.port,
            )
            try:
                await stack.enter_async_context(server)
            except OSError as exc:
                # Another process holds the port; it may let go of it: worth a restart.
                where = f"{config.metrics.host}:{config.metrics.port}"
                raise TemporaryError(
                    f"cannot listen for metrics on {where}: {exc.strerror or exc} "
                    "([metrics] host and port)",
                    event="metrics_listen_failed",
                ) from exc
            daemon.metrics_port = server.port  # MetricsServer logs `metrics_listening`
        if on_started is not None:
            await on_started(daemon)
        return await daemon.run()
    raise AssertionError("unreachable")  # pragma: no cover
