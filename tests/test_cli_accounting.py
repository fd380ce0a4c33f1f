"""estimate, status (cost, budget, --watch), run's progress and prune, as users run them:
real processes, the fake API, pipes, and a real pseudo-terminal."""

from __future__ import annotations

import math
import os
import pty
import select
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.support.backends import Peek
from tests.support.cli import BATCHD, batchd
from tests.support.params import request_params


def enqueue(env: dict[str, str], count: int, *, model: str = "claude-haiku-4-5") -> list[bytes]:
    """Enqueue `count` tasks; returns the params exactly as stored (what the estimate reads)."""
    params = [request_params(f"Question {n}", max_tokens=100).replace(
        "claude-haiku-4-5-20251001", model) for n in range(count)]  # fmt: skip
    lines = [
        orjson.dumps({"custom_id": f"{model}-{n}", "params": orjson.loads(p)})
        for n, p in enumerate(params)
    ]
    assert batchd("enqueue", "-", env=env, stdin=b"\n".join(lines)).returncode == 0
    return [orjson.dumps(orjson.loads(p)) for p in params]


@pytest.mark.both_stores
def test_estimate_run_status_watch_and_prune(
    cli_env: dict[str, str], tmp_path: Path, peek: Peek, store_backend: str
) -> None:
    stored = enqueue(cli_env, 6)
    enqueue(cli_env, 1, model="claude-unknown-7")
    if store_backend == "postgresql":  # jsonb's own text, which is what is sent and counted
        rows = peek.query("SELECT params::text FROM tasks WHERE custom_id LIKE 'claude-haiku%'")
        stored = [row[0].encode() for row in rows]

    figures = orjson.loads(batchd("estimate", "--json", env=cli_env).stdout)
    haiku = next(m for m in figures["models"] if m["model"] == "claude-haiku-4-5")
    input_tokens = math.ceil(sum(len(p) for p in stored) / 4)
    assert (haiku["requests"], haiku["input_tokens"], haiku["output_tokens_max"]) == (
        6,
        input_tokens,
        600,
    )
    # batch upper bound: (input x $1 + 600 x $5) / 1e6 / 2
    assert haiku["cost_max_usd"] == pytest.approx((input_tokens + 3000) / 2e6, abs=1e-6)
    assert figures["unpriced_models"] == ["claude-unknown-7"]
    text = batchd("estimate", env=cli_env).stdout.decode()
    assert "pending: 7 request(s)" in text
    assert 'UNPRICED: claude-unknown-7: not counted above; add [pricing."claude-unknown-7"]' in text

    run = batchd("run", "--exit-when-idle", env=cli_env)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    progress = [
        orjson.loads(line) for line in run.stdout.splitlines() if b'"event": "progress"' in line
    ]
    assert progress, "plain progress log lines when not on a terminal"
    assert (progress[-1]["done"], progress[-1]["total"]) == (7, 7)
    assert "\x1b[K" not in run.stdout.decode() + run.stderr.decode()  # no bar on a pipe

    status = orjson.loads(batchd("status", "--json", env=cli_env).stdout)
    usage = status["usage"]
    assert usage["requests"] == 7
    assert usage["unpriced_models"] == ["claude-unknown-7"]
    assert usage["cost_usd"] > 0
    assert usage["standard_cost_usd"] == pytest.approx(2 * usage["cost_usd"])
    assert status["results"] == {"unmatched": 0, "missing_requeued": 0, "archived_requeued": 0}
    assert status["budget"] is None

    watched = batchd("status", "--watch", "--interval", "0.05", "--count", "2", env=cli_env)
    lines = watched.stdout.decode().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("done 7/7 (100.0%)") for line in lines)

    export = tmp_path / "old.jsonl"
    pruned = batchd("prune", "--older-than", "0s", "--export", str(export), env=cli_env)
    assert pruned.returncode == 0, pruned.stderr.decode()
    assert "pruned 7 finished task(s)" in pruned.stdout.decode()
    assert len(export.read_bytes().splitlines()) == 7
    after = orjson.loads(batchd("status", "--json", env=cli_env).stdout)
    assert sum(after["tasks"].values()) == 0
    assert after["usage"] == usage  # spending outlives the tasks
    again = batchd("prune", "--older-than", "0s", "--export", str(export), env=cli_env)
    assert again.returncode == 2
    assert "cannot create" in again.stderr.decode()
    assert batchd("prune", "--older-than", "soon", env=cli_env).returncode == 2


def test_a_spent_budget_ends_an_exit_when_idle_run_and_status_says_so(
    cli_env: dict[str, str],
) -> None:
    config = Path(cli_env["BATCHD_CONFIG"])
    # One task is at most ~ (100 x $5) / 1e6 / 2 = $0.00025 (+ a little input), one batch
    # of 4 ~$0.001: the budget admits smaller batches as long as the oldest task fits.
    config.write_text(config.read_text() + "[budget]\nmax_spend_usd = 0.00105\n")
    enqueue(cli_env, 40)

    run = batchd("run", "--exit-when-idle", env=cli_env)
    assert run.returncode == 75, run.stderr.decode()[-2000:]
    logs = run.stdout.decode()
    assert '"event": "submission_paused_budget"' in logs
    assert '"event": "daemon_stopping_budget_paused"' in logs
    status = orjson.loads(batchd("status", "--json", env=cli_env).stdout)
    done, waiting = status["tasks"]["succeeded"], status["tasks"]["pending"]
    assert (done + waiting, status["tasks"]["submitted"]) == (40, 0)
    assert 4 < done < 40  # more than one full batch's bound went, then the money ran out
    assert status["budget"]["paused"] is True
    assert status["budget"]["spent_usd"] <= 0.00105
    text = batchd("status", env=cli_env).stdout.decode()
    assert "submission: paused: budget ($0.000" in text


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> bytes:
    """Run with stdout and stderr on a new pseudo-terminal; everything it drew."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([*BATCHD, *args], env=env, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            assert ready, "no output from the terminal"
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
        assert process.wait(timeout=timeout) == 0, output.decode(errors="replace")[-2000:]
    return output


def test_on_a_terminal_run_draws_a_bar_and_watch_redraws_the_screen(
    cli_env: dict[str, str],
) -> None:
    enqueue(cli_env, 6)
    drawn = run_on_a_terminal(["run", "--exit-when-idle"], cli_env).decode()
    assert "\r\x1b[K[" in drawn  # the bar, redrawn in place
    assert "[####################] 6/6 100%" in drawn
    assert "batch_created" in drawn  # console log lines still shown, between bars
    assert '"event"' not in drawn  # console format on a terminal, not JSON

    screen = run_on_a_terminal(["status", "--watch", "--interval", "0.05", "--count", "2"], cli_env)
    assert screen.count(b"\x1b[H\x1b[2J") == 2
    assert b"tasks 6   done 6 (100.0%)" in screen
    assert b"cost $0.00" in screen
