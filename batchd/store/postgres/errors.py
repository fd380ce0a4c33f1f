"""What goes wrong between batchd and a PostgreSQL server, as StoreErrors a user can act on.

Every message names the database by its masked DSN (never its password) and says what to
do. `retryable` tells the daemon whether waiting can help (the server is down, starting,
full of connections) or not (wrong password, no such database, a schema of another
application): the unit must not restart for ever on the latter.
"""

from __future__ import annotations

from batchd.store.errors import StoreError


class PostgresError(StoreError):
    """A PostgreSQL store error; `retryable` is False where retrying cannot help."""


class PostgresUnavailableError(PostgresError):
    """The server cannot be reached now (down, restarting, out of connections): retry."""

    retryable = True


class PostgresRefusedError(PostgresError):
    """The server refused us for a reason retrying will not change (auth, database)."""


class ForeignSchemaError(PostgresError):
    """Tables of batchd's names in the schema belong to another application."""
