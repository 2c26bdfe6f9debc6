"""promtool against the alert rules, their unit tests, the scrape config, the dashboard's
queries and the metrics exposition.

promtool is Prometheus' own checker (Debian package ``prometheus``; ``.ci/run`` installs it).
Without it these tests skip on a developer machine, but fail under CI (``CI`` set): there
they are the only proof that the rules load into a real Prometheus.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.metrics import Metrics
from tests.unit.test_deploy_artifacts import dashboard_queries, populate_every_metric

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool; skipped without it, unless running in CI where that is an error."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus); CI needs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run(promtool: str, *args: str, cwd: Path | None = None, stdin: bytes = b"") -> tuple[int, str]:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, input=stdin, capture_output=True, timeout=60, check=False
    )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def test_alert_rules_load_in_prometheus(promtool: str) -> None:
    """`promtool check rules` accepts alerts.yml and counts every rule."""
    code, out = run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert code == 0, out
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_alert_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules` runs every firing and non-firing case of alerts_test.yml."""
    code, out = run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert code == 0, out
    assert "SUCCESS" in out


def test_alert_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """With the born-at-1 branch of SaeRollbackFailed removed, the unit tests fail."""
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    broken = rules.replace('{status="failed"} offset 15m', '{status="failed"} offset 1m', 1)
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS_DIR / "alerts_test.yml", tmp_path)
    code, out = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert code != 0
    assert "the first failure of a process" in out


def test_scrape_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """`promtool check config` accepts prometheus.yml and the rule file it loads."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    # The compose file mounts alerts.yml at the absolute path; point at the local copy.
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    code, out = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert code == 0, out


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables substituted, parses as PromQL."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{n}", "expr": q} for n, q in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    code, out = run(promtool, "check", "rules", str(path))
    assert code == 0, out
    assert f"SUCCESS: {len(queries)} rules found" in out


def test_metrics_exposition_passes_promtool_lint(promtool: str) -> None:
    """The text exposition of a registry with samples of every metric lints clean."""
    metrics = Metrics(CollectorRegistry())
    populate_every_metric(metrics)
    exposition = generate_latest(metrics.registry)
    assert exposition.count(b"# TYPE ") >= len(list(metrics.registry.collect()))
    code, out = run(promtool, "check", "metrics", stdin=exposition)
    assert (code, out) == (0, "")


def test_metrics_lint_reports_a_bad_exposition(promtool: str) -> None:
    """The lint is live: a counter without the _total suffix is reported."""
    bad = b"# HELP x_requests requests\n# TYPE x_requests counter\nx_requests 1\n"
    code, out = run(promtool, "check", "metrics", stdin=bad)
    assert code != 0
    assert '"_total" suffix' in out
