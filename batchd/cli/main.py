"""Command line: parses arguments and calls into the rest; no logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TextIO, cast

import orjson

# The daemon, the demo and the fake API's server are imported by their own commands only:
# each pulls in aiohttp's client or server, ~0.2 s of every other command's start.
from batchd.cli import commands, operator_commands
from batchd.cli.failures import check_database_directory, report_failure, store_failure
from batchd.cli.opening import open_for_command
from batchd.cli.progress import (
    RATE_WINDOW_S,
    LogThroughBar,
    ProgressBar,
    ProgressSnapshot,
    rate_from_completions,
    watch,
    watch_snapshot,
)
from batchd.cli.prune import DurationError, open_export, parse_duration, prune
from batchd.config import Config, ConfigError, api_key_source, load_config, resolve_api_key
from batchd.domain import FAILED_TASK_STATUSES, FINAL_TASK_STATUSES, BatchState, TaskStatus
from batchd.fakeapi.arguments import add_arguments as add_fake_api_arguments
from batchd.money.spending import estimate_status, render_estimate
from batchd.service.exits import (
    EXIT_CONFIG,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    ConfigurationError,
    StartupError,
)
from batchd.service.logs import configure_logging, syslog_prefix
from batchd.store import Store, StoreError

_MAX_PORT = 65535


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Run large LLM workloads through the Message Batches API, durably.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (default: $BATCHD_CONFIG)")
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="log lines as JSON, as console text, or auto: console on a terminal, JSON "
        "otherwise (default: [logging] format; console for demo and fake-api)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure, not only its message"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument(
        "--exit-when-idle", action="store_true", help="return once nothing is pending or in flight"
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    enqueue = sub.add_parser("enqueue", help="add tasks from a JSONL file of API request items")
    enqueue.add_argument("file", help='path, or "-" for standard input')
    status = sub.add_parser("status", help="counts per status, batches in flight, or tasks")
    status.add_argument(
        "custom_ids",
        nargs="*",
        metavar="CUSTOM_ID",
        help="show these tasks instead of the counts (exit 1 if one does not exist)",
    )
    status.add_argument("--json", action="store_true", help="one JSON document, not text")
    status.add_argument(
        "--watch", action="store_true", help="redraw every --interval seconds (Ctrl-C to stop)"
    )
    status.add_argument("--interval", type=float, help="with --watch: seconds (default: 2)")
    status.add_argument("--count", type=int, help="with --watch: stop after this many")
    estimate = sub.add_parser("estimate", help="what the pending tasks would cost")
    estimate.add_argument("--json", action="store_true", help="one JSON document, not text")
    prune_cmd = sub.add_parser("prune", help="remove old finished tasks, then vacuum")
    prune_cmd.add_argument(
        "--older-than", required=True, help="completed before this long ago: 30d, 12h, 2w"
    )
    prune_cmd.add_argument("--export", type=Path, help="write them to this new JSONL file first")
    prune_cmd.add_argument("--no-vacuum", action="store_true", help="skip the VACUUM")
    results = sub.add_parser("results", help="export result lines in the API's JSONL shape")
    results.add_argument("-o", "--output", type=Path, help="file (default: standard output)")
    results.add_argument(
        "--force", action="store_true", help="with -o: overwrite the file if it exists"
    )
    results.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in TaskStatus],
        help="only these statuses (repeatable; default: all with a result)",
    )
    cancel = sub.add_parser("cancel", help="cancel tasks")
    cancel.add_argument(
        "custom_ids",
        nargs="*",
        metavar="CUSTOM_ID",
        help="these tasks: pending ones end canceled, submitted ones are flagged (exit 1 if "
        "one does not exist)",
    )
    cancel.add_argument("--all", action="store_true", help="every pending and submitted task")
    cancel.add_argument(
        "--status",
        action="append",
        choices=[TaskStatus.PENDING.value, TaskStatus.SUBMITTED.value],
        help="every task in this status (repeatable)",
    )
    batches = sub.add_parser("batches", help="local batches: state, counts, age, expiry")
    batches.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in BatchState],
        help="only batches in this state (repeatable; default: all)",
    )
    batches.add_argument("--limit", type=int, default=50, help="newest N (default: 50)")
    batches.add_argument("--json", action="store_true", help="one JSON document, not text")
    tasks = sub.add_parser("tasks", help="tasks in one status, oldest first")
    tasks.add_argument(
        "--status", required=True, choices=[s.value for s in TaskStatus], help="the status to list"
    )
    tasks.add_argument("--limit", type=int, default=50, help="at most N (default: 50)")
    tasks.add_argument("--json", action="store_true", help="one JSON document, not text")
    acknowledge = sub.add_parser(
        "acknowledge-duplicate",
        help="a suspected duplicate batch was seen to: kept on record, no longer alarmed",
    )
    acknowledge.add_argument(
        "batch_ids",
        nargs="+",
        metavar="API_BATCH_ID",
        help="the API's id of a suspected duplicate batch",
    )
    acknowledge.add_argument("--note", default="", help="why (kept with the record)")
    retry = sub.add_parser("retry", help="put failed tasks back in the queue")
    retry.add_argument(
        "custom_ids",
        nargs="*",
        metavar="CUSTOM_ID",
        help="only these tasks, among those in the --status statuses (default: all of them)",
    )
    retry.add_argument(
        "--status",
        action="append",
        # Only final tasks go back to the queue: a pending or submitted one is not offered.
        choices=[s.value for s in TaskStatus if s in FINAL_TASK_STATUSES],
        help="statuses to retry (default: errored, expired, canceled)",
    )
    demo = sub.add_parser("demo", help="run everything against the bundled fake API")
    demo.add_argument(
        "--tasks", type=int, default=36, help="how many tasks to enqueue (default: %(default)s)"
    )
    fake = sub.add_parser("fake-api", help="serve the Message Batches API emulator")
    add_fake_api_arguments(fake)
    return parser


def check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone; exits 2 (argparse's usage error) with its message."""
    if args.command == "fake-api" and not 0 <= args.port <= _MAX_PORT:
        parser.error(f"fake-api --port must be between 0 and {_MAX_PORT}, not {args.port}")
    if args.command == "status":
        if not args.watch and (args.count is not None or args.interval is not None):
            parser.error("status --count and --interval need --watch")
        if args.interval is not None and args.interval <= 0:
            parser.error("status --interval must be > 0")
        if args.count is not None and args.count < 1:
            parser.error("status --count must be >= 1")
    if args.command in ("batches", "tasks") and args.limit < 1:
        parser.error(f"{args.command} --limit must be >= 1")
    if args.command == "cancel":
        given = sum((bool(args.custom_ids), args.all, bool(args.status)))
        if given != 1:
            parser.error("cancel takes CUSTOM_IDs, --all or --status (one of them)")
    if args.command == "results" and args.force and args.output is None:
        parser.error("results --force needs -o FILE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_usage(parser, args)
    try:
        return _main(args)
    except KeyboardInterrupt:
        return 130 if args.command != "status" else 0  # Ctrl-C ends `status --watch`
    except StartupError as exc:
        return report_failure(exc.exit_code, exc.event, str(exc), debug=args.debug)
    except ConfigError as exc:  # a setting found wrong only once it is used
        message = f"config error: {exc}"
        return report_failure(EXIT_CONFIG, "config_invalid", message, debug=args.debug)
    except StoreError as exc:
        failure = store_failure(exc)
        return report_failure(failure.exit_code, failure.event, str(failure), debug=args.debug)
    except OSError as exc:
        if exc.filename is None:
            return _unforeseen(exc, debug=args.debug)
        # A file batchd was told to use (the database, a lock, a key file) is unusable.
        message = f"cannot use {exc.filename}: {exc.strerror or exc}"
        return report_failure(EXIT_CONFIG, "file_unusable", message, debug=args.debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, exit 70
        return _unforeseen(exc, debug=args.debug)


def _unforeseen(exc: Exception, *, debug: bool) -> int:
    message = f"internal error: {type(exc).__name__}: {exc}"
    if not debug:
        message += " (--debug shows the traceback)"
    return report_failure(EXIT_SOFTWARE, "internal_error", message, debug=debug)


def _main(args: argparse.Namespace) -> int:
    if args.command == "fake-api":
        from batchd.fakeapi.server import serve as serve_fake_api  # noqa: PLC0415

        # Its lines go to stdout, where its first one (the URL) has always been read.
        log_format = args.log_format or "console"
        json_logs = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
        configure_logging("json" if json_logs else "console", "info", stream=sys.stdout)
        return asyncio.run(serve_fake_api(args, json_logs=json_logs))
    if args.command == "demo":
        configure_logging(args.log_format or "console", "info")
        from batchd.cli.demo import run_demo  # noqa: PLC0415

        return asyncio.run(run_demo(args.tasks))
    daemon_output: TextIO = sys.stdout if args.command == "run" else sys.stderr
    # Until the file is read, its log settings are not known: a failure to read it is
    # logged where the command's other lines would go.
    configure_logging(args.log_format or "auto", "info", stream=daemon_output)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise ConfigurationError(f"config error: {exc}", event="config_invalid") from None
    if args.command == "run" and args.exit_when_idle and sys.stderr.isatty():
        args.progress_bar = ProgressBar(sys.stderr)
        if daemon_output.isatty():
            daemon_output = cast(TextIO, LogThroughBar(daemon_output, args.progress_bar))
    configure_logging(
        args.log_format or config.logging.format, config.logging.level, stream=daemon_output
    )
    if config.database.url is None:  # a SQLite file: its directory must be usable
        check_database_directory(config.database.path)
    return asyncio.run(_dispatch(args, config))


async def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "run":
        return await _run(args, config)
    handlers: dict[str, Callable[[Store, argparse.Namespace], Awaitable[int]]] = {
        "migrate": _migrate,
        "enqueue": _enqueue,
        "status": partial(_status, config=config),
        "estimate": partial(_estimate, config=config),
        "prune": _prune,
        "results": _results,
        "cancel": _cancel,
        "retry": _retry,
        "batches": operator_commands.batches,
        "tasks": operator_commands.tasks,
        "acknowledge-duplicate": operator_commands.acknowledge_duplicate,
    }
    store = await open_for_command(args.command, config.database)
    try:
        return await handlers[args.command](store, args)
    finally:
        await store.close()


async def _run(args: argparse.Namespace, config: Config) -> int:
    try:
        api_key = resolve_api_key(config)
    except ConfigError as exc:  # restarting cannot fix the key: EX_CONFIG, as a 401
        raise ConfigurationError(str(exc), event="api_key_unusable") from None
    if not api_key:
        raise ConfigurationError(
            f"no API key: set ${config.api.api_key_env}, [api] api_key_file, or a "
            "systemd credential named anthropic-api-key",
            event="api_key_missing",
        )
    if args.exit_when_idle:
        from batchd.cli.runprogress import RunView, run_with_progress  # noqa: PLC0415

        code = await run_with_progress(
            config, api_key, RunView(getattr(args, "progress_bar", None))
        )
    else:
        from batchd.service.daemon import run_daemon  # noqa: PLC0415

        code = await run_daemon(config, api_key)
    if code == EXIT_CONFIG:  # the daemon logged `api_key_refused`; the person reads this
        source = api_key_source(config) or "unknown"
        print(
            f"{syslog_prefix('error', sys.stderr)}batchd: the API refused the API key "
            f"(key from {source}): fix it, then start batchd again",
            file=sys.stderr,
        )
    return code


async def _migrate(store: Store, args: argparse.Namespace) -> int:
    print("database schema is up to date")  # open_for_command applied whatever was missing.
    return 0


async def _enqueue(store: Store, args: argparse.Namespace) -> int:
    try:
        stream = commands.open_input(args.file)
    except OSError as exc:
        print(f"batchd: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with stream:
        summary = await commands.enqueue_file(store, stream)
    print(commands.render_enqueue(summary))
    return 1 if summary.bad_lines else 0


async def _status(store: Store, args: argparse.Namespace, *, config: Config) -> int:
    if args.watch:
        return await _watch(store, args, config)
    if args.custom_ids:
        rows = await store.tasks_by_custom_id(args.custom_ids)
        if args.json:
            print(orjson.dumps([commands.task_json(r) for r in rows]).decode())
        else:
            print("\n".join(commands.render_task(r) for r in rows))
        missing = set(args.custom_ids) - {r.custom_id for r in rows}
        for custom_id in sorted(missing):
            print(f"{custom_id}: no such task", file=sys.stderr)
        return _named_ids_exit(unknown=bool(missing), acted=bool(rows))
    snapshot = await commands.status_snapshot(store, config)
    print(orjson.dumps(snapshot).decode() if args.json else commands.render_status(snapshot))
    return 0


async def _watch(store: Store, args: argparse.Namespace, config: Config) -> int:
    async def read() -> ProgressSnapshot:
        status = await commands.status_snapshot(store, config)
        return watch_snapshot(status, datetime.now(UTC))

    async def read_rate() -> float:
        since = datetime.now(UTC) - timedelta(seconds=RATE_WINDOW_S)
        count, _ = await store.completed_since(since)
        return rate_from_completions(count)

    await watch(
        read,
        sys.stdout,
        interval_s=2.0 if args.interval is None else args.interval,
        tty=sys.stdout.isatty(),
        count=args.count,
        clock_text=lambda: f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        read_rate=read_rate,
    )
    return 0


async def _estimate(store: Store, args: argparse.Namespace, *, config: Config) -> int:
    figures = await estimate_status(store.accounts, config)
    print(orjson.dumps(figures).decode() if args.json else render_estimate(figures))
    return 0


async def _prune(store: Store, args: argparse.Namespace) -> int:
    try:
        cutoff = datetime.now(UTC) - parse_duration(args.older_than)
    except DurationError as exc:
        print(f"batchd: --older-than {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.export is None:
        report = await prune(store, cutoff, vacuum=not args.no_vacuum)
    else:
        try:
            export = open_export(args.export)
        except OSError as exc:
            print(f"batchd: cannot create {args.export}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        with export:
            report = await prune(store, cutoff, export=export, vacuum=not args.no_vacuum)
    print(commands.render_prune(report))
    return 0


async def _results(store: Store, args: argparse.Namespace) -> int:
    statuses = [TaskStatus(s) for s in args.status] if args.status else list(TaskStatus)
    if args.output is None:
        count = await commands.export_results(store, sys.stdout.buffer, statuses)
    else:
        try:
            # Never over an earlier export without being told (prune --export never does).
            out = args.output.open("wb" if args.force else "xb")
        except FileExistsError:
            print(
                f"batchd: {args.output} exists: --force overwrites it, or choose another file",
                file=sys.stderr,
            )
            return EXIT_USAGE
        except OSError as exc:
            print(f"batchd: cannot create {args.output}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        with out:
            count = await commands.export_results(store, out, statuses)
    print(f"exported {count} result line(s)", file=sys.stderr)
    return 0


def _named_ids_exit(*, unknown: bool, acted: bool) -> int:
    """The exit code of a command given CUSTOM_IDs (`status`, `cancel`, `retry`), one rule
    for scripts: 1 if an id is unknown or none of them could be acted on; 0 otherwise
    (each id not acted on is still named)."""
    return 1 if unknown or not acted else 0


async def _cancel(store: Store, args: argparse.Namespace) -> int:
    if not args.custom_ids:
        return await operator_commands.cancel_waiting(store, args)
    report = await store.request_cancel(args.custom_ids)
    print(commands.render_cancel(report))
    return _named_ids_exit(
        unknown=bool(report.unknown), acted=bool(report.canceled or report.flagged)
    )


async def _retry(store: Store, args: argparse.Namespace) -> int:
    statuses = [TaskStatus(s) for s in args.status] if args.status else sorted(FAILED_TASK_STATUSES)
    asked = list(dict.fromkeys(args.custom_ids))
    # Read before: once requeued, a task no longer shows the status it was retried from.
    rows = await store.tasks_by_custom_id(asked) if asked else []
    status_of = {row.custom_id: row.status for row in rows}
    count = await store.retry_tasks(statuses, asked)
    print(f"requeued {count} task(s)")
    # As `status` and `cancel` do: each id asked for and not acted on is named.
    skipped = [cid for cid in asked if cid in status_of and status_of[cid] not in statuses]
    for custom_id in skipped:
        status = status_of[custom_id]
        why = (
            f"--status {status} retries it"
            if status in FINAL_TASK_STATUSES
            else "only finished tasks are retried"
        )
        print(f"{custom_id}: {status}, not retried ({why})", file=sys.stderr)
    unknown = [cid for cid in asked if cid not in status_of]
    for custom_id in unknown:
        print(f"{custom_id}: no such task", file=sys.stderr)
    if not asked:
        return 0  # every failed task was asked for: none is no failure
    return _named_ids_exit(unknown=bool(unknown), acted=count > 0)


if __name__ == "__main__":
    sys.exit(main())
