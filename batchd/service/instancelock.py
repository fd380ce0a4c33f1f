"""One daemon per database: two would each take the other's `creating` batch for a lost
create, release it after the grace and send its requests again (paid twice, unrecorded).

`batchd run` holds an exclusive `flock` on `<database>.lock` for its whole life (the
database's real path: a symlink to it or a relative spelling finds the same lock). The
kernel releases it when the process dies, however it dies, so a `kill -9` never leaves a
stale lock behind. Other commands (status, enqueue, ...) do not take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from batchd.store import StoreError


class AlreadyRunningError(StoreError):
    """Another `batchd run` holds the database's lock."""


def lock_path(database: Path) -> Path:
    """`<database>.lock` beside the real database file, however `database` is spelled.

    A symlink to the database (or a path through one) must lead to the same lock as the
    file itself, or two daemons could run on one database; SQLite resolves symlinks the
    same way for its -wal and -shm files. realpath, not Path.resolve: on a symlink loop it
    returns a path instead of raising, and opening the database then says what is wrong.
    """
    real = Path(os.path.realpath(database))
    return real.with_name(real.name + ".lock")


@contextlib.contextmanager
def daemon_lock(database: Path) -> Iterator[None]:
    """Hold the one-daemon lock of `database`, or raise AlreadyRunningError at once."""
    path = lock_path(database)
    try:
        # Group-writable like the database, for a service and its operators' group.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    except OSError as exc:
        raise StoreError(
            f"cannot create the lock file {path}: {exc.strerror} (this user must be able to "
            "write the database's directory)"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunningError(
                f"another batchd (pid {holder}) is already running on {database}: one daemon "
                f"per database (it holds {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
