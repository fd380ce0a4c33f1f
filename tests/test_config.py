import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchd.config import (
    BudgetSettings,
    CollectorSettings,
    Config,
    ConfigError,
    load_config,
    resolve_api_key,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(text)
    return path


def test_no_file_gives_documented_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.batching.max_requests == 10_000
    assert config.batching.max_bytes == 256_000_000


def test_example_config_loads_and_equals_the_defaults() -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    assert load_config(example, env={}) == Config()


def test_values_and_friendly_key_names_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[batching]\nmax_requests = 500\nlinger_seconds = 2\n"
        '[polling]\ninterval_seconds = 1.5\n[database]\npath = "x.db"\n',
    )
    config = load_config(path, env={})
    assert config.batching.max_requests == 500
    assert config.batching.linger_s == 2.0
    assert config.polling.interval_s == 1.5
    assert config.database.path == Path("x.db")


def test_batchd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[batching]\nmax_requests = 7\n")
    assert load_config(None, env={"BATCHD_CONFIG": str(path)}).batching.max_requests == 7


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[batching]\nmax_requests = 100001\n", "[batching] max_requests"),
        ("[batching]\nmax_requests = 'many'\n", "[batching] max_requests"),
        ("[batching]\nmax_bytes = 300000000\n", "[batching] max_bytes"),
        ("[batching]\nmax_reqests = 5\n", "[batching] max_reqests: unknown key"),
        ("[polling]\ninterval_seconds = 0\n", "[polling] interval_seconds"),
        ("[bogus]\nx = 1\n", "bogus"),
        ("[api]\napi_key = 'sk-secret'\n", "[api] api_key"),
        ("[api]\nbase_url = 'ftp://x'\n", "[api] base_url"),
        ("[logging]\nformat = 'xml'\n", "[logging] format"),
        ("[batching\n", "not valid TOML"),
    ],
)
def test_a_bad_config_fails_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert named in str(caught.value)
    assert "sk-secret" not in str(caught.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_base_url_comes_from_the_environment_unless_the_file_sets_it(tmp_path: Path) -> None:
    env = {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    assert load_config(None, env=env).api.base_url == "http://127.0.0.1:9"
    path = write(tmp_path, "[api]\nbase_url = 'http://10.0.0.1:1'\n")
    assert load_config(path, env=env).api.base_url == "http://10.0.0.1:1"


def test_api_key_from_env_file_or_systemd_credential(tmp_path: Path) -> None:
    config = load_config(None, env={})
    assert resolve_api_key(config, env={"ANTHROPIC_API_KEY": " k1\n"}) == "k1"
    (tmp_path / "anthropic-api-key").write_text("k2\n")
    assert resolve_api_key(config, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "k2"
    assert resolve_api_key(config, env={}) is None
    key_file = tmp_path / "key"
    key_file.write_text("k3")
    path = write(tmp_path, f"[api]\napi_key_file = '{key_file}'\n")
    assert resolve_api_key(load_config(path, env={}), env={"ANTHROPIC_API_KEY": "k1"}) == "k3"
    key_file.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_key(load_config(path, env={}), env={})


@pytest.mark.parametrize(
    ("key", "where"),
    [("sk-ant-\u201cabc\u201d", "U+201C at position 8"), ("sk ant", "U+0020 at position 3")],
    ids=["curly-quote", "space"],
)
def test_a_key_that_cannot_be_sent_in_a_header_is_refused_without_showing_it(
    key: str, where: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)) as caught:
        resolve_api_key(Config(), env={"ANTHROPIC_API_KEY": key})
    assert "sk" not in str(caught.value)


@pytest.mark.parametrize("grace", ["0", "0.0", "4.9", "-1"])
def test_a_reconcile_grace_too_short_to_outwait_the_list_is_refused(
    tmp_path: Path, grace: str
) -> None:
    # Shorter, a create whose answer was lost could be sent again before the list endpoint
    # shows the batch it made: the same requests paid for twice.
    path = write(tmp_path, f"[batching]\nreconcile_grace_seconds = {grace}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    message = str(refused.value)
    assert message.startswith("[batching] reconcile_grace_seconds: must be >= 5 ")
    assert f"got {float(grace):g}" in message


@pytest.mark.parametrize("grace", ["5", "60.0", "3600"])
def test_a_reconcile_grace_of_5_seconds_or_more_is_accepted(tmp_path: Path, grace: str) -> None:
    path = write(tmp_path, f"[batching]\nreconcile_grace_seconds = {grace}\n")
    assert load_config(path, env={}).batching.reconcile_grace_s == float(grace)


@pytest.mark.parametrize("grace", ["0", "0.0", "-1", "0.5", "0.999"])
def test_a_not_found_grace_under_a_second_is_refused(tmp_path: Path, grace: str) -> None:
    # Shorter than the API's 404s for a batch it has just created (seen a second after the
    # create, spec §7.6): a batch that exists is declared lost and its requests are sent,
    # and paid for, again.
    path = write(tmp_path, f"[polling]\nnot_found_grace_seconds = {grace}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    message = str(refused.value)
    assert message.startswith("[polling] not_found_grace_seconds: must be >= 1 (")
    assert message.endswith(f"got {float(grace):g}")


@pytest.mark.parametrize("grace", ["1", "1.0", "60.0"])
def test_a_not_found_grace_of_a_second_or_more_is_accepted(tmp_path: Path, grace: str) -> None:
    path = write(tmp_path, f"[polling]\nnot_found_grace_seconds = {grace}\n")
    assert load_config(path, env={}).polling.not_found_grace_s == float(grace)


@pytest.mark.parametrize(
    ("toml", "refusal"),
    [
        ("[batching]\nreconcile_grace_seconds = 0\n", "[batching] reconcile_grace_seconds: "),
        ("[polling]\nnot_found_grace_seconds = 0\n", "[polling] not_found_grace_seconds: "),
    ],
)
def test_run_refuses_a_zero_grace_at_start_the_same_way(
    tmp_path: Path, toml: str, refusal: str
) -> None:
    """Both graces guard against paying twice: the real CLI stops before opening anything."""
    path = write(tmp_path, f'[database]\npath = "{tmp_path / "batchd.db"}"\n{toml}')
    run = subprocess.run(
        [sys.executable, "-m", "batchd", "--config", str(path), "run", "--exit-when-idle"],
        env={**os.environ, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 78  # EXIT_CONFIG (EX_CONFIG), as every config error
    assert run.stderr.startswith(f"batchd: config error: {refusal}must be "), run.stderr
    assert run.stderr.rstrip().endswith("got 0"), run.stderr
    assert not (tmp_path / "batchd.db").exists()


def test_components_reading_several_sections_get_them_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[batching]\nmax_attempts = 7\nmax_requests = 40\n[results]\nchunk_size = 9\n"
        '[budget]\nmax_spend_usd = 12.5\n[pricing."m"]\ninput = 1\noutput = 2\n',
    )
    config = load_config(path, env={})
    collecting = CollectorSettings.of(config)
    assert (collecting.results.chunk_size, collecting.max_attempts) == (9, 7)
    budget = BudgetSettings.of(config)
    assert budget is not None
    assert (budget.budget.max_spend_usd, budget.next_batch_requests) == (12.5, 40)
    assert set(budget.pricing.models) == {"m"}


def test_no_budget_settings_without_a_spend_limit(tmp_path: Path) -> None:
    assert BudgetSettings.of(load_config(write(tmp_path, "[budget]\nperiod = 'day'\n"), {})) is None
