"""Progress rendering as pure functions: snapshots in, text out; the watch loop on a pipe."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from batchd.cli.progress import (
    BatchProgress,
    LogThroughBar,
    ProgressBar,
    ProgressSnapshot,
    RateMeter,
    eta_s,
    format_duration,
    progress_snapshot,
    rate_from_completions,
    render_bar,
    render_line,
    render_watch,
    watch,
)

TASKS = {
    "pending": 500,
    "submitted": 300,
    "succeeded": 180,
    "errored": 15,
    "canceled": 3,
    "expired": 1,
    "invalid": 1,
}
SNAPSHOT = ProgressSnapshot(
    TASKS,
    (
        BatchProgress("msgbatch_a", "in_progress", 200, 120, 200.0),
        BatchProgress(None, "creating", 100, 0, None),
    ),
    ("submission paused: budget (over)",),
    "cost $0.0100 at batch prices",
)


def test_rate_is_measured_over_a_sliding_window() -> None:
    meter = RateMeter(window_s=60)
    assert meter.rate() is None
    meter.add(0, 0)
    assert meter.rate() is None
    meter.add(10, 50)
    assert meter.rate() == 5.0
    meter.add(40, 50)  # no progress for 30 s: 50 tasks over 40 s
    assert meter.rate() == 1.25
    meter.add(75, 50)  # the window (the last 60 s) no longer holds the burst
    assert meter.rate() == 0.0


def test_eta_and_durations() -> None:
    assert eta_s(800, 4.0) == 200.0
    assert eta_s(0, None) == 0.0
    assert eta_s(5, 0.0) is None
    assert [format_duration(s) for s in (None, 59.6, 200, 3 * 3600 + 5 * 60, 2 * 86400 + 7200)] == [
        "unknown",
        "1m00s",
        "3m20s",
        "3h05m",
        "2d02h",
    ]


def test_the_watch_view() -> None:
    text = render_watch(SNAPSHOT, 4.0, "2026-11-24 16:00:00 UTC")
    assert text.splitlines() == [
        "batchd status   2026-11-24 16:00:00 UTC",
        "",
        "tasks 1,000   done 200 (20.0%) (+120 processed by the API)   "
        "[######----....................]",
        "  pending 500  submitted 300  succeeded 180  errored 15  canceled 3  expired 1  invalid 1",
        "throughput 4.0 tasks/s (last 5m00s)   ETA 3m20s",
        "batches in flight 2   (requests processed/sent, age)",
        "  msgbatch_a                           in_progress     120/200     age 3m20s",
        "  (creating)                           creating          0/100     age unknown",
        "cost $0.0100 at batch prices",
        "!! submission paused: budget (over)",
    ]


def test_the_plain_line_and_the_bar() -> None:
    assert render_line(SNAPSHOT, None) == (
        "done 200/1,000 (20.0%) (+120 processed by the API) pending 500 submitted 300 "
        "batches 2 rate measuring "
        "eta unknown | submission paused: budget (over)"
    )
    assert render_bar(SNAPSHOT, 4.0, 200) == (
        "[####--..............] 200/1,000 20% (+120 processed by the API) | 2 in flight | "
        "4.0 tasks/s | ETA 3m20s"
        " | submission paused: budget (over)"
    )
    assert len(render_bar(SNAPSHOT, 4.0, 40)) == 39  # never wraps the terminal line


def test_progress_from_a_status_snapshot() -> None:
    status = {
        "tasks": TASKS,
        "batches_in_flight": [
            {
                "batch_id": "msgbatch_a",
                "state": "in_progress",
                "requests": 200,
                "request_counts": {"processing": 80, "succeeded": 120},
                "submitted_at": "2026-11-24T15:55:00+00:00",
            }
        ],
    }
    snapshot = progress_snapshot(status, datetime(2026, 11, 24, 16, 0, tzinfo=UTC))
    assert snapshot.batches == (BatchProgress("msgbatch_a", "in_progress", 200, 120, 300.0),)
    assert (snapshot.total, snapshot.done, snapshot.remaining) == (1000, 200, 800)


def test_log_lines_clear_the_bar_and_redraw_it() -> None:
    screen = io.StringIO()
    bar = ProgressBar(screen)
    logs = LogThroughBar(screen, bar)  # type: ignore[arg-type]
    bar.update("[#...] 1/4")
    logs.write("batch_created")
    logs.write("\n")
    logs.flush()
    bar.finish()
    assert screen.getvalue() == (
        "\r\x1b[K[#...] 1/4" + "\r\x1b[K" + "batch_created\n" + "\r\x1b[K[#...] 1/4"
        "\r\x1b[K[#...] 1/4\n"
    )


async def test_watch_prints_a_line_per_interval_when_not_on_a_terminal() -> None:
    done = iter([100, 160, 220])
    completed_in_window = iter([0, 1800, 1800])

    async def read() -> ProgressSnapshot:
        finished = next(done)
        return ProgressSnapshot({"pending": 300 - finished, "succeeded": finished})

    async def read_rate() -> float:  # tasks completed in the 300 s window, per second
        return rate_from_completions(next(completed_in_window))

    out = io.StringIO()
    await watch(
        read,
        out,
        interval_s=0.001,
        tty=False,
        count=3,
        clock_text=lambda: "now",
        read_rate=read_rate,
    )
    assert out.getvalue().splitlines() == [
        "done 100/300 (33.3%) pending 200 submitted 0 batches 0 rate 0.0 tasks/s eta unknown",
        "done 160/300 (53.3%) pending 140 submitted 0 batches 0 rate 6.0 tasks/s eta 23s",
        "done 220/300 (73.3%) pending 80 submitted 0 batches 0 rate 6.0 tasks/s eta 13s",
    ]


def test_a_log_line_after_the_final_bar_does_not_draw_it_again() -> None:
    screen = io.StringIO()
    bar = ProgressBar(screen)
    logs = LogThroughBar(screen, bar)  # type: ignore[arg-type]
    bar.update("[####] 4/4")
    bar.finish()  # the run's last figures, drawn before `daemon_stopped` is logged
    logs.write("daemon_stopped\n")
    logs.flush()
    assert screen.getvalue() == "\r\x1b[K[####] 4/4" + "\r\x1b[K[####] 4/4\n" + "daemon_stopped\n"
