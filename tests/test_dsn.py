"""PostgreSQL URLs: masked wherever they are shown, checked before use."""

import pytest

from batchd.store.dsn import UNREADABLE, DsnError, check_dsn, mask_dsn


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:s%40c:r@et@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgres://user@host:5432/db", "postgres://user@host:5432/db"),
        ("postgresql://host/db", "postgresql://host/db"),
        ("postgresql:///db?host=/var/run/postgresql", "postgresql:///db?host=/var/run/postgresql"),
        (
            "postgresql://u@h/db?sslmode=require&password=secret&sslpassword=other",
            "postgresql://u@h/db?sslmode=require&password=***&sslpassword=***",
        ),
        ("postgresql://u:secret@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("postgresql://u:secret@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u:secret@h/db#secret", "postgresql://u:***@h/db"),
        ("postgresql://:secret@h/db", "postgresql://:***@h/db"),
    ],
)
def test_mask_dsn_hides_every_password(dsn: str, shown: str) -> None:
    assert mask_dsn(dsn) == shown
    assert "secret" not in mask_dsn(dsn)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=h password=secret dbname=db",  # libpq's key=value form: not a URL
        "mysql://u:secret@h/db",
        "postgresql:u:secret@h/db",
        "postgresql://u:secret@[::1/db",  # urlsplit refuses the bracket
    ],
)
def test_a_dsn_that_does_not_parse_is_not_shown_at_all(dsn: str) -> None:
    assert mask_dsn(dsn) == UNREADABLE


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@h:5432/db",
        "postgres://u:p@h/db",
        "postgresql:///db",
        "postgresql://u:p@h1:5432,h2:5433/db",
    ],
)
def test_check_dsn_accepts_postgresql_urls_naming_a_database(dsn: str) -> None:
    check_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "says"),
    [
        ("host=h password=secret", "must start with postgresql://"),
        ("postgresql://u:secret@h:5432", "names no database"),
        ("postgresql://u:secret@h:5432/", "names no database"),
        ("postgresql://u:secret@h:99999/db", "port is not a number"),
        ("postgresql://u:secret@h:abc/db", "port is not a number"),
        ("mysql://u:secret@h/db", "must start with postgresql://"),
    ],
)
def test_check_dsn_refuses_with_a_masked_message(dsn: str, says: str) -> None:
    with pytest.raises(DsnError, match=says) as raised:
        check_dsn(dsn)
    assert "secret" not in str(raised.value)
