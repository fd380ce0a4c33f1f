"""config.example.toml, the docs and batchd/config.py agree on every key and its default,
and a key is read under its documented spelling only (never a second, undocumented one)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from batchd.config import Config, ConfigError, documented_keys, load_config, resolve_api_key
from batchd.money.pricing import ModelPrice

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
_TABLE = re.compile(r"^(?:# )?\[([a-z_]+)(?:\.[a-z0-9.-]+)?\]$")  # [pricing.MODEL]: pricing
_SET = re.compile(r"^([a-z_]+) = ")
_SHOWN = re.compile(r"^# ([a-z_]+) = ")  # shown commented out: unset unless given

Key = tuple[str, str]  # (section, key)


def example_keys() -> tuple[set[Key], set[Key]]:
    """(keys the example sets, keys it shows commented out), by section."""
    set_keys: set[Key] = set()
    shown: set[Key] = set()
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if table := _TABLE.match(line):
            section = table.group(1)
        elif key := _SET.match(line):
            set_keys.add((section, key.group(1)))
        elif key := _SHOWN.match(line):
            shown.add((section, key.group(1)))
    return set_keys, shown


def every_key() -> set[Key]:
    return {(section, key) for section, keys in documented_keys().items() for key in keys}


def test_the_example_shows_every_key_batchd_reads_and_no_other() -> None:
    set_keys, shown = example_keys()
    assert set_keys, "the example's keys are found"
    assert not set_keys & shown
    assert set_keys | shown == every_key()


def test_every_key_the_example_sets_holds_its_default() -> None:
    assert load_config(EXAMPLE, env={}) == Config()
    written = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    set_keys, _ = example_keys()
    for section, key in set_keys:  # key by key, so a failure names it
        field = documented_keys()[section][key]
        default = getattr(getattr(Config(), section), field)
        value = written[section][key]
        assert (str(default) if isinstance(default, Path) else default) == value, (section, key)


def test_every_key_shown_commented_out_is_unset_by_default_and_valid_as_shown(
    tmp_path: Path,
) -> None:
    _, shown = example_keys()
    for section, key in shown - {("pricing", key) for key in documented_keys()["pricing"]}:
        field = documented_keys()[section][key]
        assert getattr(getattr(Config(), section), field) is None, (section, key)
    # Every line uncommented (and the SQLite path dropped, as the url's comment says):
    # a configuration batchd takes, with exactly those values.
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    text = "\n".join(
        line[2:] if line.startswith("# ") and (_SHOWN.match(line) or _TABLE.match(line)) else line
        for line in lines
        if not line.startswith("path = ")
    )
    path = tmp_path / "batchd.toml"
    path.write_text(text + "\n", encoding="utf-8")
    config = load_config(path, env={})
    assert config.database.url == "postgresql://batchd@db.example.com:5432/batchd"
    assert config.database.schema == "batchd"
    assert config.api.api_key_file == Path("/etc/batchd/api-key")
    assert config.budget.max_spend_usd == 50.0
    assert config.pricing.models == {"claude-haiku-4-5": ModelPrice(1.0, 5.0, 1.25, 0.1)}


# Each key whose documented spelling is not the field's name: (section, key, field).
RENAMED = [
    ("api", "request_timeout_seconds", "request_timeout_s"),
    ("batching", "linger_seconds", "linger_s"),
    ("batching", "reconcile_grace_seconds", "reconcile_grace_s"),
    ("batching", "duplicate_watch_seconds", "duplicate_watch_s"),
    ("polling", "interval_seconds", "interval_s"),
    ("polling", "not_found_grace_seconds", "not_found_grace_s"),
    ("results", "lease_seconds", "lease_s"),
]


def test_the_renamed_list_is_every_key_spelled_apart_from_its_field() -> None:
    renamed = {
        (section, key, field)
        for section, keys in documented_keys().items()
        for key, field in keys.items()
        if key != field
    }
    assert renamed == set(RENAMED)


@pytest.mark.parametrize(("section", "key", "field"), RENAMED)
def test_a_fields_own_name_is_refused_naming_the_documented_key(
    tmp_path: Path, section: str, key: str, field: str
) -> None:
    path = tmp_path / "batchd.toml"
    path.write_text(f"[{section}]\n{field} = 99\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"[{section}] {field}: unknown key (the key is {key})"
    path.write_text(f"[{section}]\n{key} = 99\n")
    assert getattr(getattr(load_config(path, env={}), section), field) == 99


@pytest.mark.parametrize("first_documented", [True, False])
@pytest.mark.parametrize(("section", "key", "field"), RENAMED)
def test_one_setting_under_both_spellings_is_an_error_naming_both(
    tmp_path: Path, section: str, key: str, field: str, first_documented: bool
) -> None:
    lines = [f"{key} = 61", f"{field} = 99"]
    path = tmp_path / "batchd.toml"
    path.write_text(f"[{section}]\n" + "\n".join(lines if first_documented else lines[::-1]))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert f"[{section}] {key}" in str(caught.value)
    assert f"[{section}] {field}" in str(caught.value)


_MENTION = re.compile(r"\[([a-z_]+)\]`? `?([a-z_]+)")


def test_every_key_the_docs_name_is_one_batchd_reads() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {
        (document.name, section, key)
        for document in documents
        for section, key in _MENTION.findall(document.read_text(encoding="utf-8"))
        if section in documented_keys()
    }
    assert len(named) > 10, "the docs' `[section] key` mentions are found"
    keys = every_key()
    assert {entry for entry in named if entry[1:] not in keys} == set()


def test_the_api_key_is_read_in_the_order_readme_and_the_example_give(tmp_path: Path) -> None:
    # README and config.example.toml: api_key_file, then the environment, then systemd's
    # credential; the first found wins.
    (tmp_path / "anthropic-api-key").write_text("from-credential\n")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    config_path = tmp_path / "batchd.toml"
    config_path.write_text(f"[api]\napi_key_file = '{key_file}'\n")
    env = {"ANTHROPIC_API_KEY": "from-env", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_api_key(load_config(config_path, env={}), env=env) == "from-file"
    assert resolve_api_key(Config(), env=env) == "from-env"
    assert resolve_api_key(Config(), env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == (
        "from-credential"
    )
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"The API key is read, first found wins, from (.*?);", readme)
    assert said is not None
    order = [
        said.group(1).index(where) for where in ("api_key_file", "ANTHROPIC_API_KEY", "systemd")
    ]
    assert order == sorted(order)
