"""structlog set-up: one event per line, JSON unless a person is watching.

Under systemd the lines go to the journal, which stores every line of a stream at the
unit's default priority (info) unless the line starts with a `<N>` syslog priority
(`SyslogLevelPrefix=`, on by default; systemd.exec(5)). When the stream written to is
the journal, every line carries its level's priority, so `journalctl -p warning` works.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog(3) priorities, as journald reads them from a `<N>` prefix.
SYSLOG_PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}


def is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is connected to journald: `$JOURNAL_STREAM` names its device:inode.

    systemd sets `JOURNAL_STREAM=<dev>:<ino>` for a service whose stdout or stderr is the
    journal; comparing it with the stream's own fstat() tells a journal stream from one
    inherited and redirected elsewhere (systemd.exec(5), "$JOURNAL_STREAM").
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO, closed)
        return False
    return (found.st_dev, found.st_ino) == (int(device), int(inode))


def syslog_prefix(level: str, stream: TextIO) -> str:
    """`<N>` for a line of this level written to `stream` if it is the journal, else ''."""
    if not is_journal(stream):
        return ""
    return f"<{SYSLOG_PRIORITIES.get(level, SYSLOG_PRIORITIES['info'])}>"


class _PriorityPrefix:
    """Wraps the renderer: prefixes each rendered line with its level's `<N>`."""

    def __init__(self, renderer: structlog.types.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        level = str(event_dict.get("level", method_name))
        rendered = self._renderer(logger, method_name, event_dict)
        prefix = f"<{SYSLOG_PRIORITIES.get(level, SYSLOG_PRIORITIES['info'])}>"
        if isinstance(rendered, bytes):
            return prefix.encode() + rendered
        return prefix + str(rendered)


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """JSON lines for journald and pipes; colourless console lines on a terminal."""
    stream = sys.stderr if stream is None else stream
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    if is_journal(stream):
        renderer = _PriorityPrefix(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
