"""Errors every store raises, whichever database is behind it."""

from __future__ import annotations


class StoreError(Exception):
    """The database cannot be used as it is (read-only, full, newer schema, closed...).

    `retryable`: the database is unavailable for now (a server restarting, unreachable)
    and waiting is the remedy; the daemon then waits with backoff rather than failing.
    """

    retryable: bool = False


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer batchd than this one."""


class SchemaTooOldError(StoreError):
    """A read-only open met a schema older than this batchd's, and a read needs what the
    missing migrations add (`batchd migrate` upgrades it)."""


class DatabaseMissingError(StoreError):
    """No database where the configuration says, and this open may not create one."""
