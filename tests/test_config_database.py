"""[database] url / schema and BATCHD_DATABASE_URL: choosing the PostgreSQL store."""

from pathlib import Path

import pytest

from batchd.config import ConfigError, DatabaseConfig, load_config
from batchd.store import StoreError, open_store

URL = "postgresql://batchd:secret@db.example.com:5432/batchd"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(text)
    return path


def test_sqlite_stays_the_default_with_no_url() -> None:
    config = load_config(None, env={})
    assert config.database.url is None
    assert config.database.schema is None
    assert config.database.path == Path("batchd.db")


def test_url_and_schema_are_read_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[database]\nurl = "{URL}"\nschema = "jobs"\n')
    config = load_config(path, env={})
    assert config.database.url == URL
    assert config.database.schema == "jobs"


def test_environment_url_overrides_the_files_url(tmp_path: Path) -> None:
    path = write(tmp_path, f'[database]\nurl = "{URL}"\n')
    other = "postgresql://other@localhost/other"
    config = load_config(path, env={"BATCHD_DATABASE_URL": other})
    assert config.database.url == other


def test_environment_url_alone_selects_postgresql() -> None:
    config = load_config(None, env={"BATCHD_DATABASE_URL": URL})
    assert config.database.url == URL


def test_path_and_url_in_the_file_is_an_error_naming_both(tmp_path: Path) -> None:
    path = write(tmp_path, f'[database]\npath = "x.db"\nurl = "{URL}"\n')
    with pytest.raises(ConfigError, match=r"\[database\] path and \[database\] url") as raised:
        load_config(path, env={})
    assert "secret" not in str(raised.value)


def test_path_in_the_file_and_url_in_the_environment_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\npath = "x.db"\n')
    with pytest.raises(ConfigError, match=r"\[database\] path .* BATCHD_DATABASE_URL"):
        load_config(path, env={"BATCHD_DATABASE_URL": URL})


def test_an_empty_environment_url_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\npath = "x.db"\n')
    config = load_config(path, env={"BATCHD_DATABASE_URL": ""})
    assert config.database.url is None


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('url = "mysql://u:secret@h/db"', r"\[database\] url: .*must start with postgresql://"),
        ('url = "postgresql://u:secret@h"', r"\[database\] url: .*names no database"),
        ("url = 5", r"\[database\] url: expected a non-empty string"),
        ('url = ""', r"\[database\] url: expected a non-empty string"),
        ('schema = "jobs"', r"\[database\] schema: only for PostgreSQL"),
    ],
)
def test_bad_database_values_name_the_key_and_mask_the_password(
    tmp_path: Path, toml: str, says: str
) -> None:
    path = write(tmp_path, f"[database]\n{toml}\n")
    with pytest.raises(ConfigError, match=says) as raised:
        load_config(path, env={})
    assert "secret" not in str(raised.value)


def test_a_bad_environment_url_is_reported_masked() -> None:
    with pytest.raises(ConfigError, match=r"\[database\] url: .*names no database") as raised:
        load_config(None, env={"BATCHD_DATABASE_URL": "postgresql://u:secret@h"})
    assert "secret" not in str(raised.value)


def test_schema_name_longer_than_postgresql_keeps_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'[database]\nurl = "{URL}"\nschema = "{"s" * 64}"\n')
    with pytest.raises(ConfigError, match=r"\[database\] schema: must be at most 63 bytes"):
        load_config(path, env={})


async def test_a_url_no_server_answers_is_a_masked_error_and_sqlite_is_not_used(
    tmp_path: Path,
) -> None:
    path = tmp_path / "batchd.db"
    closed = "postgresql://batchd:secret@127.0.0.1:1/batchd"  # port 1: refused at once
    database = DatabaseConfig(path=path, url=closed)
    with pytest.raises(StoreError, match=r"postgresql://batchd:\*\*\*@127.0.0.1:1") as raised:
        await open_store(database)
    assert "secret" not in str(raised.value)
    assert not path.exists()  # no silent SQLite file instead
