"""The command line as users run it: real processes, a real fake-api server, real files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
import pytest

from tests.support.cli import batchd
from tests.support.params import request_params


@pytest.mark.both_stores
def test_enqueue_run_status_results_cancel_retry(
    cli_env: dict[str, str], tmp_path: Path, store_backend: str
) -> None:
    migrated = batchd("migrate", env=cli_env)
    assert migrated.returncode == 0, migrated.stderr.decode()
    lines = [
        orjson.dumps({"custom_id": f"c-{n}", "params": orjson.loads(request_params(f"q{n}"))})
        for n in range(10)
    ]
    lines += [b"{broken json", b'{"params": {}}', lines[0]]
    enqueued = batchd("enqueue", "-", env=cli_env, stdin=b"\n".join(lines) + b"\n")
    out = enqueued.stdout.decode()
    assert enqueued.returncode == 1  # bad lines are reported, the good ones kept
    assert "enqueued 10 task(s)" in out
    assert "1 duplicate custom_id(s)" in out
    assert "line 11: not valid JSON" in out
    assert "line 12: custom_id is missing" in out

    canceled = batchd("cancel", "c-9", "nope", env=cli_env)
    assert "canceled 1 pending task(s)" in canceled.stdout.decode()
    assert canceled.returncode == 1  # "nope" is unknown

    run = batchd("run", "--exit-when-idle", env=cli_env)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    logs = run.stdout.decode()
    assert '"event": "batch_created"' in logs  # JSON lines when not on a terminal
    assert "sk-test-secret-key" not in logs + run.stderr.decode()

    status = batchd("status", "--json", env=cli_env)
    snapshot = orjson.loads(status.stdout)
    assert snapshot["tasks"]["succeeded"] == 9
    assert snapshot["tasks"]["canceled"] == 1
    assert snapshot["batches_in_flight"] == []

    one = orjson.loads(batchd("status", "c-3", "--json", env=cli_env).stdout)
    assert one[0]["status"] == "succeeded"
    assert "q3" in one[0]["result"]["message"]["content"][0]["text"]
    human = batchd("status", env=cli_env).stdout.decode()
    assert re.search(r"succeeded\s+9", human)

    out_file = tmp_path / "results.jsonl"
    exported = batchd("results", "-o", str(out_file), "--status", "succeeded", env=cli_env)
    assert exported.returncode == 0
    results = [orjson.loads(line) for line in out_file.read_bytes().splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"c-{n}" for n in range(9)]
    assert all(r["result"]["type"] == "succeeded" for r in results)

    retried = batchd("retry", "--status", "canceled", env=cli_env)
    assert "requeued 1 task(s)" in retried.stdout.decode()
    assert batchd("run", "--exit-when-idle", env=cli_env).returncode == 0
    assert orjson.loads(batchd("status", "c-9", "--json", env=cli_env).stdout)[0]["status"] == (
        "succeeded"
    )


def test_a_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[batching]\nmax_requests = 0\n")
    result = batchd("--config", str(config), "status", env=dict(os.environ))
    assert result.returncode == 78  # EX_CONFIG: the unit does not restart on it
    assert "[batching] max_requests" in result.stderr.decode()


def test_run_without_an_api_key_says_how_to_give_one(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    environment["BATCHD_CONFIG"] = str(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text(f'[database]\npath = "{tmp_path / "x.db"}"\n')
    result = batchd("run", env=environment)
    assert result.returncode == 78
    assert "ANTHROPIC_API_KEY" in result.stderr.decode()


def test_run_with_a_key_that_cannot_be_sent_exits_78_without_printing_it(tmp_path: Path) -> None:
    environment = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-secret\u2019"}
    environment["BATCHD_CONFIG"] = str(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text(f'[database]\npath = "{tmp_path / "x.db"}"\n')
    result = batchd("run", env=environment)
    assert result.returncode == 78
    assert "U+2019 at position 14" in result.stderr.decode()
    assert b"secret" not in result.stderr + result.stdout


def test_demo_runs_to_completion() -> None:
    result = batchd("demo", "--tasks", "12", env=dict(os.environ), timeout=90)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "12 succeeded" in out
    assert "product-bad: invalid" in out
