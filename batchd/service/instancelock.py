"""One daemon per database: two would each take the other's `creating` batch for a lost
create, release it after the grace and send its requests again (paid twice, unrecorded).

`batchd run` holds an exclusive `flock` on `<database>.lock` for its whole life (the
database's real path: a symlink to it or a relative spelling finds the same lock). The
kernel releases it when the process dies, however it dies, so a `kill -9` never leaves a
stale lock behind. `migrate` and `enqueue` take it only while they create or migrate the
database (cli/opening.py): refused while a daemon runs, so no daemon finds its schema
changed under it. The other commands (status, cancel, retry, ...) never take it. SQLite
only: a PostgreSQL store keeps its own locks on the server (store/postgres/leader.py).
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
        fd = _open_lock(path, database)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file {path}: {exc.strerror} (this user must be able to "
            "write the database's directory, and the lock file if it exists: batchd creates "
            "it with the database's group and mode)"
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


def _open_lock(path: Path, database: Path) -> int:
    """The lock file, opened for writing; shared like the database if this call creates it.

    Whoever creates it (the service, or `migrate` / `enqueue` from a shell or as root), the
    daemon, another user of the database's group, must open it next: a `0640` lock file
    left by a shell's umask 022 stopped the service with exit 78.
    """
    flags = os.O_RDWR | os.O_CLOEXEC
    for _ in range(3):  # removed between the two opens (by hand): create it again
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o660)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, flags)
            continue
        # A file system without modes or owners (refusing them) keeps what it gives.
        with contextlib.suppress(OSError):
            _share_like_the_database(fd, database)
        return fd
    return os.open(path, flags | os.O_CREAT, 0o660)


def _share_like_the_database(fd: int, database: Path) -> None:
    """Give a new lock file the database's group and its group's access, never more than
    0660: the umask of whoever created it must not decide who may run the daemon.

    A database not created yet (this command is about to create it): 0660, the mode batchd
    creates databases with (store/sqlite/database.py) when the umask lets it.
    """
    try:
        info = os.stat(database)
    except FileNotFoundError:
        os.fchmod(fd, 0o660)
        return
    if os.fstat(fd).st_gid != info.st_gid:
        # The directory is not setgid: the creator's group would lock the daemon out. Only
        # a member of the database's group may give it (a shell of a user of the database).
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, info.st_gid)
    os.fchmod(fd, 0o600 | (info.st_mode & 0o060))
