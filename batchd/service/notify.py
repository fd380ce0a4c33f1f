"""sd_notify, written by hand: one datagram per message to `$NOTIFY_SOCKET`.

The protocol (sd_notify(3)): newline-separated `NAME=value` assignments sent as one
AF_UNIX SOCK_DGRAM datagram to the path in `$NOTIFY_SOCKET`; a leading `@` means
Linux's abstract namespace. Without `$NOTIFY_SOCKET` (not under systemd, or
`Type=simple`) every method is a no-op, so the daemon calls them unconditionally.

A failed send must never take the daemon down: systemd may have gone away or the
socket buffer may be full. Sends are non-blocking, errors are logged once and
swallowed; the watchdog is what notices a daemon that truly stopped talking.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger("batchd.service.notify")

# systemd (src/core/manager.c, NOTIFY_BUFFER_MAX = PIPE_BUF) drops larger datagrams,
# so a long STATUS= would silently never show in `systemctl status`.
MAX_DATAGRAM_BYTES = 4096
MAX_STATUS_CHARS = 1000

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

HealthProbe = Callable[[], Awaitable[bool]]


class Notifier:
    """Talks to systemd's notify socket; does nothing at all when there is none."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
    ) -> None:
        """`address` as in `$NOTIFY_SOCKET` (path or `@abstract`); None disables everything."""
        self._address: str | bytes | None = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False
        if self._address is not None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                self._warn(exc)
                self._address = None
            else:
                sock.setblocking(False)
                self._sock = sock

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as sd_watchdog_enabled(3)."""
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=_watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to send to."""
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec=), or None when disabled."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping is not fatal.
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        """Start-up finished: systemd marks the unit active and `systemctl start` returns."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """A one-line human status shown by `systemctl status`."""
        return self.notify(STATUS=text[:MAX_STATUS_CHARS])

    def stopping(self) -> bool:
        """Shutdown has begun (systemd shows `deactivating` instead of a hung unit)."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """Keep-alive ping; systemd kills the service if it is missing for WatchdogSec=."""
        return self.notify(WATCHDOG=1)

    def notify(self, **fields: str | int) -> bool:
        """Send `NAME=value` lines as one datagram; True if sent, False if disabled or failed.

        Field names are upper case (as sd_notify defines them); a newline inside a value
        would start a new assignment, so it is replaced by a space.
        """
        for name in fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"sd_notify field name must be upper case: {name!r}")
        if self._sock is None or self._address is None or not fields:
            return False
        lines = (f"{name}={_one_line(value)}" for name, value in fields.items())
        payload = "\n".join(lines).encode("utf-8", errors="replace")
        try:
            self._sock.sendto(payload[:MAX_DATAGRAM_BYTES], self._address)
        except OSError as exc:  # BlockingIOError (buffer full), ECONNREFUSED, ENOENT, ...
            self._warn(exc)
            return False
        return True

    async def watchdog_loop(self, healthy: HealthProbe) -> None:
        """Send WATCHDOG=1 every `watchdog_interval_s`, but only while `healthy()` says so.

        Returns at once when the watchdog is disabled; otherwise runs until cancelled.
        A probe that raises or hangs means no ping: a wedged daemon is exactly what
        systemd's watchdog is there to kill and restart.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        was_healthy = True
        while True:
            try:
                is_healthy = await healthy()
            except Exception:
                log.exception("watchdog_probe_failed")
                is_healthy = False
            if is_healthy:
                self.watchdog()
            elif was_healthy:
                log.warning("watchdog_withheld", interval_s=interval_s)
            if is_healthy and not was_healthy:
                log.info("watchdog_resumed")
            was_healthy = is_healthy
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn(self, exc: OSError) -> None:
        # Once: if systemd is gone every later send fails the same way, and a warning
        # per STATUS= update would flood the journal.
        if not self._warned:
            self._warned = True
            log.warning("notify_failed", error=str(exc), error_type=type(exc).__name__)


def _one_line(value: str | int) -> str:
    # A newline would end this assignment and start another one of the sender's making.
    return str(value).replace("\n", " ")


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of `@`.
        return b"\0" + os.fsencode(address[1:])
    return address


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC, unless WATCHDOG_PID names another process (a parent's watchdog)."""
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=raw_usec)
        return None
    return usec if usec > 0 else None
