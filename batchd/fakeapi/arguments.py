"""The `batchd fake-api` command-line options, apart from the server: building the
command line of `batchd` must not import aiohttp's web server for every command."""

from __future__ import annotations

import argparse
from pathlib import Path

from batchd.fakeapi.faults import DEFAULT_FAULT_KINDS, ENDPOINTS, FAULT_KINDS

DEFAULT_CLI_PORT = 8765


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `batchd fake-api` options."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=int,
        default=DEFAULT_CLI_PORT,
        help="port; 0 picks a free one and prints it (default: %(default)s)",
    )
    add("--api-key", help="require exactly this key (default: any non-empty key)")
    add(
        "--processing-seconds",
        type=float,
        default=3.0,
        help="each request finishes within this many seconds; 0 ends batches at once",
    )
    add(
        "--expiry-seconds",
        type=float,
        default=24 * 3600.0,
        help="batches expire this long after creation (default: 24 h)",
    )
    add(
        "--cancel-delay-seconds",
        type=float,
        default=1.0,
        help="time a cancel spends in 'canceling' (default: %(default)s)",
    )
    add(
        "--incremental-counts",
        action="store_true",
        help="move request_counts while processing (default: only at the end, as documented)",
    )
    add("--models", default="", help="comma list of known models; others give errored lines")
    add("--seed", type=int, help="seed every random choice (ids, order, faults)")
    add("--state", type=Path, help="keep state in this JSON file across restarts")
    add("--error-rate", type=float, default=0.0, help="share of requests that come back errored")
    add(
        "--retryable-error-share",
        type=float,
        default=0.5,
        help="of the errored ones, share with api_error/overloaded_error (default: %(default)s)",
    )
    add("--expire-rate", type=float, default=0.0, help="share of requests that come back expired")
    add("--fault-rate", type=float, default=0.0, help="share of HTTP calls that fail")
    add(
        "--fault-kinds",
        default=",".join(DEFAULT_FAULT_KINDS),
        help=f"comma list of {', '.join(FAULT_KINDS)} (default: %(default)s)",
    )
    add(
        "--fault-endpoints",
        default="all",
        help=f"comma list of {', '.join(ENDPOINTS)}, or all (default: %(default)s)",
    )
    add("--retry-after", type=float, default=1.0, help="retry-after seconds sent with 429")
    add("--slow-seconds", type=float, default=2.0, help="delay of the 'slow' fault")
    add(
        "--late-create-seconds",
        type=float,
        default=5.0,
        help="the 'late_create' fault commits the batch this long after dropping the "
        "client's connection (default: %(default)s)",
    )
    add(
        "--fault-limit",
        type=int,
        default=0,
        help="inject at most this many HTTP faults, then none (default: 0, no limit)",
    )
    add(
        "--results-truncate-rate",
        type=float,
        default=0.0,
        help="share of results downloads cut off midway",
    )
    add(
        "--not-found-after-create-seconds",
        type=float,
        default=0.0,
        help="retrieve answers 404 this long after a batch's creation",
    )
    add(
        "--list-lag-seconds",
        type=float,
        default=0.0,
        help="the list endpoint shows a batch only once it is this old (retrieve at once)",
    )
