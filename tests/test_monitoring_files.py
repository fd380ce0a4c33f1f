"""docs/monitoring/: the alert rules pass promtool, fire when they should (promtool's own
rule tests), and every query in them and in the Grafana dashboard names metrics batchd
actually exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

from batchd.service.metrics import BATCHD_METRICS
from tests.support.tools import require_executable

MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
RULES = MONITORING / "batchd-alerts.yml"
RULE_TESTS = MONITORING / "batchd-alerts.test.yml"
DASHBOARD = MONITORING / "batchd-dashboard.json"
ALERTS = {
    "BatchdDown",
    "BatchdBatchNearExpiry",
    "BatchdNoSuccessfulPoll",
    "BatchdTasksFailing",
    "BatchdBudgetExhausted",
}


@pytest.fixture
def promtool() -> str:
    return require_executable("promtool", "prometheus")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def dashboard_queries() -> list[str]:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_each_alert_fires_on_its_case_and_not_on_the_others(promtool: str) -> None:
    tested = run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    covered = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert covered == ALERTS


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool checks PromQL inside rule files: each panel's query becomes a recording rule.
    variables = {"$job": "batchd", "$instance": ".*"}
    rules = []
    for number, query in enumerate(dashboard_queries()):
        expr = query
        for name, value in variables.items():
            expr = expr.replace(name, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_and_dashboard_name_only_metrics_batchd_exports() -> None:
    exported = {spec.name for spec in BATCHD_METRICS}
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"]: rule["expr"] for rule in rules["groups"][0]["rules"]}
    assert set(alerts) == ALERTS
    for text in [*alerts.values(), *dashboard_queries()]:
        named = set(re.findall(r"\bbatchd_[a-z_]+", text))
        assert named or text.startswith("up{"), text
        assert named <= exported, f"{sorted(named - exported)} in {text!r}"
    # What the issue asks the alerts to watch, by the metric that carries it.
    assert "batchd_next_batch_expiry_seconds" in alerts["BatchdBatchNearExpiry"]
    assert "batchd_last_successful_poll_timestamp_seconds" in alerts["BatchdNoSuccessfulPoll"]
    assert "up{" in alerts["BatchdDown"]
