"""PostgreSQL connection URLs: which ones batchd accepts, and how they are shown.

A DSN can carry a password (`postgresql://user:secret@host/db`, or `?password=` in its
query). Every log line, error message and printout names the database through
`mask_dsn`, never the DSN itself: a password must not reach the journal or a terminal.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")
MASK = "***"
# Shown instead of a DSN that cannot be parsed: any part of it might be the password.
UNREADABLE = "(a URL that does not parse, not shown)"


class DsnError(ValueError):
    """The URL is not a PostgreSQL connection URL batchd can use (message is masked)."""


def mask_dsn(dsn: str) -> str:
    """The DSN with its password (userinfo or query) replaced by `***`.

    `postgresql://user:secret@host:5432/db` -> `postgresql://user:***@host:5432/db`. A URL
    that does not parse is not shown at all, since its password cannot be located.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return UNREADABLE
    if parts.scheme not in POSTGRES_SCHEMES or not dsn.startswith(f"{parts.scheme}://"):
        return UNREADABLE
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hosts}" if colon else f"{user}@{hosts}"
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        masked += "?" + "&".join(_masked_query(parts.query))
    # A fragment has no meaning in a DSN; it is dropped rather than risk showing a secret.
    return masked


def _masked_query(query: str) -> list[str]:
    shown = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        # password, sslpassword, and any future *password* parameter of libpq.
        text = MASK if "password" in key.lower() else quote(value, safe="/:,")
        shown.append(f"{quote(key)}={text}")
    return shown


def check_dsn(dsn: str) -> None:
    """Raise DsnError unless `dsn` is a postgresql:// URL naming a database."""
    shown = mask_dsn(dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        raise DsnError(f"{shown}: not a valid URL") from None
    if parts.scheme not in POSTGRES_SCHEMES or not dsn.startswith(f"{parts.scheme}://"):
        raise DsnError(
            f"{shown}: must start with postgresql:// (postgresql://user@host:5432/dbname)"
        )
    if not parts.path.strip("/"):
        raise DsnError(f"{shown}: names no database (postgresql://user@host:5432/dbname)")
    try:
        _ = parts.port  # an out-of-range or non-numeric port raises here
    except ValueError:
        # Multi-host URLs (host1:5432,host2:5433) are for libpq; a single port must be valid.
        if "," not in parts.netloc:
            raise DsnError(f"{shown}: the port is not a number in 1..65535") from None
