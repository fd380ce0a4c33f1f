"""Failures reported as operators want them: one log line, one human line, an exit code.

The log line (JSON under systemd) is for `journalctl -o cat | jq`; the human line on
stderr says what to do; the traceback only with `--debug`. The codes are sysexits.h's
(batchd/service/exits.py), documented in docs/operations.md, "Exit codes".
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import structlog

from batchd.service.exits import ConfigurationError, StartupError, TemporaryError
from batchd.service.instancelock import AlreadyRunningError
from batchd.service.logs import configure_logging, syslog_prefix
from batchd.store import DatabaseMissingError, SchemaTooNewError, SchemaTooOldError, StoreError

log = structlog.get_logger("batchd.cli")

# StoreError says what SQLite said; these words mark a condition that can pass by itself
# (another writer lets go, space is freed): worth a restart. Any other is for a person.
_TEMPORARY_STORE_ERRORS = ("locked", "busy", "disk is full")


def report_failure(exit_code: int, event: str, message: str, *, debug: bool) -> int:
    """Log `event` (one line), print `batchd: message` on stderr, return `exit_code`."""
    if not structlog.is_configured():  # failed before the configuration was read
        configure_logging()
    log.error(event, error=message, exit_code=exit_code)
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    print(f"{syslog_prefix('error', sys.stderr)}batchd: {message}", file=sys.stderr, flush=True)
    return exit_code


def store_failure(exc: StoreError) -> StartupError:
    """The exit code of a database that cannot be used: temporary, or a person's to fix."""
    if isinstance(exc, AlreadyRunningError):
        # The other daemon may be a `run --exit-when-idle` from a shell that ends soon.
        return TemporaryError(str(exc), event="already_running")
    if isinstance(exc, SchemaTooNewError):
        return ConfigurationError(str(exc), event="schema_too_new")
    if isinstance(exc, SchemaTooOldError):
        return ConfigurationError(str(exc), event="schema_too_old")
    if isinstance(exc, DatabaseMissingError):
        return ConfigurationError(str(exc), event="database_missing")
    if exc.retryable:  # a database server down or restarting: a restart later may do
        return TemporaryError(str(exc), event="database_unavailable")
    if any(word in str(exc) for word in _TEMPORARY_STORE_ERRORS):
        return TemporaryError(str(exc), event="database_busy")
    return ConfigurationError(str(exc), event="database_unusable")


def check_database_directory(path: Path) -> None:
    """A database in a directory that does not exist: said plainly, before SQLite tries."""
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigurationError(
            f"the database's directory {directory} {what} ([database] path = {path})",
            event="database_directory_missing",
        )
