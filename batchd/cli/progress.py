"""How far along the work is: the `status --watch` view and the progress bar of a run.

Rendering is pure (a snapshot and a rate in, text out); the loops around it only read,
draw and sleep. Throughput is measured from the snapshots themselves (tasks reaching a
final status over the last few minutes), so the first figure appears on the second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from batchd.cli.commands import status_alerts, status_snapshot
from batchd.config import Config
from batchd.domain import FINAL_TASK_STATUSES, TaskStatus
from batchd.money.pricing import format_usd as usd
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store, StoreError, open_store

log = structlog.get_logger("batchd.cli.progress")

RATE_WINDOW_S = 300.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_CLEAR_LINE = "\r\x1b[K"


@dataclass(frozen=True, slots=True)
class BatchProgress:
    batch_id: str | None  # None while the create call is in flight
    state: str
    requests: int
    processed: int  # requests the API reports as no longer processing
    age_s: float | None  # since the API accepted it


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    tasks: Mapping[str, int]
    batches: tuple[BatchProgress, ...] = ()
    alerts: tuple[str, ...] = ()  # paused by the budget, results near archival, ...
    cost_line: str | None = None

    @property
    def total(self) -> int:
        return sum(self.tasks.values())

    @property
    def done(self) -> int:
        return sum(self.tasks.get(status, 0) for status in FINAL_TASK_STATUSES)

    @property
    def remaining(self) -> int:
        return self.tasks.get(TaskStatus.PENDING, 0) + self.tasks.get(TaskStatus.SUBMITTED, 0)


def progress_snapshot(
    status: Mapping[str, Any], now: datetime, alerts: tuple[str, ...] = ()
) -> ProgressSnapshot:
    """The progress part of a `batchd status` snapshot (commands.status_snapshot)."""
    batches = []
    for batch in status["batches_in_flight"]:
        counts = batch["request_counts"] or {}
        processed = batch["requests"] - counts["processing"] if counts else 0
        since = batch["submitted_at"]
        age = None if since is None else (now - datetime.fromisoformat(since)).total_seconds()
        batches.append(
            BatchProgress(batch["batch_id"], batch["state"], batch["requests"], processed, age)
        )
    return ProgressSnapshot(status["tasks"], tuple(batches), alerts)


def watch_snapshot(status: Mapping[str, Any], now: datetime) -> ProgressSnapshot:
    """The `status --watch` view of a full status snapshot: progress, cost and alerts."""
    alerts = status_alerts(dict(status))
    budget = status.get("budget")
    if budget and budget["paused"]:
        alerts.insert(0, f"submission paused: budget ({budget['paused_reason']})")
    usage = status.get("usage")
    cost_line = None
    if usage:
        cost_line = (
            f"cost {usd(usage['cost_usd'])} at batch prices, saved {usd(usage['saving_usd'])} "
            f"against the standard API; {usage['input_tokens']:,} input and "
            f"{usage['output_tokens']:,} output tokens"
        )
    return replace(progress_snapshot(status, now, tuple(alerts)), cost_line=cost_line)


class RateMeter:
    """Tasks finished per second over a sliding window of (time, done) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> None:
        self._samples.append((at, done))
        # Keep one sample at or beyond the window's edge, so the window stays full.
        while len(self._samples) > 2 and at - self._samples[1][0] >= self._window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        if end <= start:
            return None
        return max(0, last - first) / (end - start)


def eta_s(remaining: int, rate: float | None) -> float | None:
    if remaining == 0:
        return 0.0
    if not rate:
        return None
    return remaining / rate


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _rate_text(rate: float | None) -> str:
    return "measuring" if rate is None else f"{rate:,.1f} tasks/s"


def _percent(snapshot: ProgressSnapshot) -> float:
    return 100.0 * snapshot.done / snapshot.total if snapshot.total else 100.0


def bar(snapshot: ProgressSnapshot, width: int) -> str:
    filled = round(width * _percent(snapshot) / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_watch(snapshot: ProgressSnapshot, rate: float | None, clock_text: str) -> str:
    """The full-screen view of `batchd status --watch` on a terminal."""
    tasks = snapshot.tasks
    lines = [
        f"batchd status   {clock_text}",
        "",
        f"tasks {snapshot.total:,}   done {snapshot.done:,} ({_percent(snapshot):.1f}%)   "
        + bar(snapshot, 30),
        "  " + "  ".join(f"{status} {tasks.get(status, 0):,}" for status in TaskStatus),
        f"throughput {_rate_text(rate)} (last {format_duration(RATE_WINDOW_S)})   "
        f"ETA {format_duration(eta_s(snapshot.remaining, rate))}",
        f"batches in flight {len(snapshot.batches)}   (requests processed/sent, age)",
    ]
    for batch in snapshot.batches:
        lines.append(
            f"  {batch.batch_id or '(creating)':<36} {batch.state:<11} "
            f"{batch.processed:>7,}/{batch.requests:<7,} age {format_duration(batch.age_s)}"
        )
    if snapshot.cost_line:
        lines.append(snapshot.cost_line)
    lines += [f"!! {alert}" for alert in snapshot.alerts]
    return "\n".join(lines)


def render_line(snapshot: ProgressSnapshot, rate: float | None) -> str:
    """One plain line: what `status --watch` prints per interval when not on a terminal."""
    tasks = snapshot.tasks
    text = (
        f"done {snapshot.done:,}/{snapshot.total:,} ({_percent(snapshot):.1f}%)"
        f" pending {tasks.get(TaskStatus.PENDING, 0):,}"
        f" submitted {tasks.get(TaskStatus.SUBMITTED, 0):,}"
        f" batches {len(snapshot.batches)}"
        f" rate {_rate_text(rate)}"
        f" eta {format_duration(eta_s(snapshot.remaining, rate))}"
    )
    return text + "".join(f" | {alert}" for alert in snapshot.alerts)


def render_bar(snapshot: ProgressSnapshot, rate: float | None, columns: int) -> str:
    """The one-line bar of `batchd run --exit-when-idle`, cut to the terminal's width."""
    text = (
        f"{bar(snapshot, 20)} {snapshot.done:,}/{snapshot.total:,} "
        f"{_percent(snapshot):.0f}% | {len(snapshot.batches)} in flight | "
        f"{_rate_text(rate)} | ETA {format_duration(eta_s(snapshot.remaining, rate))}"
    )
    if snapshot.alerts:
        text += f" | {snapshot.alerts[0]}"
    return text[: max(columns - 1, 10)]


class ProgressBar:
    """A bar redrawn in place on one line; log lines written through `LogThroughBar`
    clear it first and redraw it after, so the two never garble each other."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._text = ""
        self._visible = False

    def update(self, text: str) -> None:
        self._text = text
        self.show()

    def show(self) -> None:
        if self._text:
            self._out.write(_CLEAR_LINE + self._text)
            self._out.flush()
            self._visible = True

    def hide(self) -> None:
        if self._visible:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
            self._visible = False

    def finish(self) -> None:
        """Leave the last bar on its own line."""
        if self._text:
            self._out.write(_CLEAR_LINE + self._text + "\n")
            self._out.flush()
        self._visible = False


class LogThroughBar:
    """A stream for structlog that hides the bar while a log line is written."""

    def __init__(self, target: TextIO, progress_bar: ProgressBar) -> None:
        self._target = target
        self._bar = progress_bar

    def write(self, text: str) -> int:
        self._bar.hide()
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()
        self._bar.show()

    def isatty(self) -> bool:
        return self._target.isatty()


def terminal_columns() -> int:
    return shutil.get_terminal_size().columns


async def watch(
    read: Callable[[], Awaitable[ProgressSnapshot]],
    out: TextIO,
    *,
    interval_s: float,
    tty: bool,
    count: int | None,
    monotonic: Callable[[], float],
    clock_text: Callable[[], str],
) -> None:
    """Redraw the view (terminal) or print a line per interval, `count` times or forever."""
    meter = RateMeter()
    shown = 0
    while count is None or shown < count:
        snapshot = await read()
        meter.add(monotonic(), snapshot.done)
        if tty:
            out.write(_CLEAR_SCREEN + render_watch(snapshot, meter.rate(), clock_text()) + "\n")
        else:
            out.write(render_line(snapshot, meter.rate()) + "\n")
        out.flush()
        shown += 1
        if count is None or shown < count:
            await asyncio.sleep(interval_s)


# -- `batchd run --exit-when-idle`: a bar on a terminal, log lines otherwise ------------------

# sysexits.h EX_TEMPFAIL: work remains, and the budget lets none of it go before the
# period rolls over or the budget is raised; running again later is the remedy.
EXIT_BUDGET_PAUSED = 75


@dataclass(frozen=True, slots=True)
class RunView:
    """How a run shows its progress: a bar, or a log line every `log_every_s`."""

    progress_bar: ProgressBar | None
    tick_s: float = 0.5
    log_every_s: float = 10.0


async def run_with_progress(config: Config, api_key: str, view: RunView) -> int:
    """`run_daemon(exit_when_idle=True)` with its progress followed alongside it."""
    stop = asyncio.Event()
    followers: list[asyncio.Task[None]] = []

    async def started(daemon: Daemon) -> None:
        follower = _follow(daemon, config, view, stop)
        followers.append(asyncio.create_task(follower, name="progress"))

    try:
        return await run_daemon(config, api_key, exit_when_idle=True, on_started=started)
    finally:
        stop.set()
        await asyncio.gather(*followers)


async def _follow(daemon: Daemon, config: Config, view: RunView, stop: asyncio.Event) -> None:
    store = await open_store(config.database, migrate=False)
    meter = RateMeter()
    logged_at: float | None = None
    try:
        while not stop.is_set():
            snapshot = await _read_progress(store, daemon)
            if snapshot is not None:
                now = time.monotonic()
                meter.add(now, snapshot.done)
                if view.progress_bar is not None:
                    view.progress_bar.update(render_bar(snapshot, meter.rate(), terminal_columns()))
                elif logged_at is None or now - logged_at >= view.log_every_s:
                    _log_progress(snapshot, meter.rate())
                    logged_at = now
                await _stop_if_budget_blocks(daemon, snapshot)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), view.tick_s)
        if (snapshot := await _read_progress(store, daemon)) is not None:
            meter.add(time.monotonic(), snapshot.done)
            if view.progress_bar is not None:
                view.progress_bar.update(render_bar(snapshot, meter.rate(), terminal_columns()))
                view.progress_bar.finish()
            else:
                _log_progress(snapshot, meter.rate())
    finally:
        await store.close()


async def _read_progress(store: Store, daemon: Daemon) -> ProgressSnapshot | None:
    try:
        status = await status_snapshot(store, accounting=False)
    except StoreError as exc:
        # The progress display must never stop the run: skip this tick.
        log.warning("progress_read_failed", error=str(exc))
        return None
    gate = daemon.submitter.budget
    alerts = ("paused: budget",) if gate is not None and gate.paused_reason else ()
    return progress_snapshot(status, datetime.now(UTC), alerts)


async def _stop_if_budget_blocks(daemon: Daemon, snapshot: ProgressSnapshot) -> None:
    """exit-when-idle with work left that the budget holds back and nothing in flight:
    nothing more can happen in this run, so end it rather than wait for a new period."""
    gate = daemon.submitter.budget
    if gate is None or gate.paused_reason is None or snapshot.batches:
        return
    if snapshot.tasks.get(TaskStatus.SUBMITTED, 0):
        return
    fresh = (await gate.view()).paused_reason  # the gate's own answer may predate a result
    if fresh is not None:
        log.warning("daemon_stopping_budget_paused", reason=fresh)
        daemon.stop(EXIT_BUDGET_PAUSED)


def _log_progress(snapshot: ProgressSnapshot, rate: float | None) -> None:
    log.info(
        "progress",
        done=snapshot.done,
        total=snapshot.total,
        pending=snapshot.tasks.get(TaskStatus.PENDING, 0),
        submitted=snapshot.tasks.get(TaskStatus.SUBMITTED, 0),
        batches_in_flight=len(snapshot.batches),
        rate_per_s=None if rate is None else round(rate, 2),
        eta_s=_rounded(eta_s(snapshot.remaining, rate)),
        paused=snapshot.alerts[0] if snapshot.alerts else None,
    )


def _rounded(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds)
