"""Opening the database read-only (`status`, `results`, `estimate`, the listings).

A read-only open never creates the file, never migrates and never writes a page: SQLite
opens it with the `mode=ro` URI. In WAL mode a reader still needs the `-wal` and `-shm`
files beside the database (measured with real files, tests/test_readonly_open.py):

- while any connection has the database open (the daemon), they exist; reading them is
  enough (SQLite >= 3.22 maps a read-only `-shm`), whoever owns them;
- when no connection has it open they are absent, and the reader creates both (owned by
  the reader, the database file's mode, the directory's group if it is setgid) and leaves
  them behind. A reader that cannot create them gets "attempt to write a readonly
  database"; files it creates that the database's owner cannot write lock the daemon
  out at its next start (the same error). `_would_lock_out_owner` refuses that case.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from batchd.store.errors import DatabaseMissingError, StoreError

# What to tell a reader for the SQLite errors of a read-only open.
READ_ONLY_HINTS = (
    (
        "readonly",
        "no process has the database open, so SQLite must create its -wal and -shm files "
        "to read it: its directory must be writable by your group (docs/operations.md, "
        "Feeding and querying it from another user)",
    ),
    (
        "unable to open",
        "this user must be able to read the database and, while batchd runs, its -wal "
        "and -shm files (the database's group, docs/operations.md)",
    ),
    ("not a database", "the path points at a file that is not a SQLite database"),
    ("locked", "another process held the database longer than busy_timeout_ms"),
)


def read_only_uri(path: Path) -> str:
    """`file:` URI of `path` opened read-only (percent-encoded: `?` or `#` in a name)."""
    return Path(os.path.abspath(path)).as_uri() + "?mode=ro"


def check_readable(path: Path) -> None:
    """Refuse, before SQLite is asked, what a read-only open must not do or cannot do."""
    if not path.exists():
        raise DatabaseMissingError(
            f"no database at {path}: read-only commands never create one (check [database] "
            "path; `batchd migrate` or `batchd run` creates it)"
        )
    if not path.is_file():
        raise StoreError(f"{path} is not a database file")
    if reason := _would_lock_out_owner(path):
        raise StoreError(reason)


def _would_lock_out_owner(path: Path) -> str | None:
    """Why reading now would leave -wal/-shm files the database's owner cannot write.

    Only when they are absent (nobody has the database open) and this user, not the
    owner, would create them: SQLite gives them the database's mode and this user as
    owner, so the owner (the daemon) writes them only through group or other bits.
    """
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    if wal.exists() and shm.exists():
        return None
    info = path.stat()
    if os.geteuid() in (0, info.st_uid):  # root's files SQLite gives to the owner
        return None
    directory = path.parent.stat()
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return None  # it cannot create them: SQLite's own error, with READ_ONLY_HINTS
    group = directory.st_gid if directory.st_mode & stat.S_ISGID else os.getegid()
    mode = info.st_mode
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and group == info.st_gid):
        return None
    return (
        f"cannot read database {path} now without locking its owner out: nobody has it "
        f"open, so reading would create {wal.name} and {shm.name} owned by you with the "
        f"database's mode {stat.S_IMODE(mode):04o}, which its owner could not write. Make "
        "the database group-writable (chmod 0660) in a setgid directory of its group "
        "(docs/operations.md), or read while batchd runs"
    )
