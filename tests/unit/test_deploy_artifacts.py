"""The deploy artifacts (deploy/, README.md's operations) agree with the code they deploy.

Nothing here trusts a hand-written list: exposed metric names and labels come from a
``Metrics`` registry, config keys and env overrides from ``orchestrator.config``, CLI
subcommands from the CLI's own parser, SAE actions from the SAE client's source, the image
tag from ``orchestrator.__version__``. The promtool checks live in
tests/integration/test_promtool.py.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from orchestrator import __version__, cli
from orchestrator.config import ENV_PREFIX, Settings, SourceSettings, parse_settings
from orchestrator.jobs import JobStatus
from orchestrator.metrics import INTAKE_OUTCOMES, RETRY_REASONS, Metrics
from orchestrator.sae.errors import BUSY_CODES, NOT_RUNNING_CODES, PERMANENT_CODES
from orchestrator.sae.models import CODE_SUCCESS, CODE_TRANSPORT

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCS = REPO / "README.md"
IMAGE = f"sae-rollback:{__version__}"

#: Series Prometheus itself adds to every scrape target; the only non-service series allowed.
PROMETHEUS_SERIES = frozenset({"up"})
#: Labels the scrape adds (static config, ServiceMonitor relabeling, Kubernetes discovery).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "component"})
#: Label values that come from closed sets in the code.
KNOWN_LABEL_VALUES: Mapping[str, frozenset[str]] = {
    "status": frozenset(s.value for s in JobStatus),
    "reason": frozenset(RETRY_REASONS),
    "outcome": frozenset(INTAKE_OUTCOMES),
}


# ---------------------------------------------------------------------------------------
# Metrics the service exposes
# ---------------------------------------------------------------------------------------


def populate_every_metric(metrics: Metrics) -> None:
    """Give every metric of ``metrics`` samples (the integration test lints the result)."""
    for outcome in INTAKE_OUTCOMES:
        metrics.intake_requests.labels("alertmanager", outcome).inc()
    for status in JobStatus:
        metrics.jobs.labels(status.value).set(1)
        if status.is_terminal:
            metrics.jobs_finished.labels(status.value).inc()
            metrics.job_duration.labels(status.value).observe(42.0)
    for code in (CODE_SUCCESS, CODE_TRANSPORT, "Application.ChangerOrderRunning"):
        metrics.api_calls.labels("AbortAndRollbackChangeOrder", code).inc()
    metrics.api_call_duration.labels("AbortAndRollbackChangeOrder").observe(0.04)
    metrics.api_budget_per_minute.set(60)
    for reason in RETRY_REASONS:
        metrics.retries.labels(reason).inc()
    metrics.oldest_queued_age.set(3.5)
    metrics.time_to_first_call.observe(0.02)


def exposed_series() -> dict[str, frozenset[str]]:
    """Every series name a Metrics registry exposes, with the label names it carries."""
    metrics = Metrics(CollectorRegistry())
    populate_every_metric(metrics)
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"populate_every_metric() does not populate {family.name}"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


def test_exposed_series_follow_prometheus_naming() -> None:
    """Counters expose _total, histograms _bucket/_sum/_count, gauges their own name."""
    series = exposed_series()
    assert "sae_rollback_jobs_finished_total" in series
    assert "sae_rollback_jobs_finished" not in series
    assert {"le", "action"} <= series["sae_rollback_api_call_duration_seconds_bucket"]
    assert "sae_rollback_api_call_duration_seconds_count" in series
    assert series["sae_rollback_oldest_queued_age_seconds"] == frozenset()


# ---------------------------------------------------------------------------------------
# A small PromQL scanner: which series does an expression select, with which matchers?
# ---------------------------------------------------------------------------------------

_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "@"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*(?:[eE][+-]?[0-9]+)?")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*")

Matcher = tuple[str, str, str]


def _read_string(expr: str, i: int) -> tuple[str, int]:
    quote, j, out = expr[i], i + 1, []
    while j < len(expr) and expr[j] != quote:
        if expr[j] == "\\" and quote != "`":
            j += 1
            out.append({"n": "\n", "t": "\t"}.get(expr[j], expr[j]))
        else:
            out.append(expr[j])
        j += 1
    if j >= len(expr):
        raise ValueError(f"unterminated string in {expr!r}")
    return "".join(out), j + 1


def _read_matchers(expr: str, i: int) -> tuple[list[Matcher], int]:
    """Parse ``{a="x", b=~`y`}`` starting at the brace at ``i``."""
    matchers: list[Matcher] = []
    j = i + 1
    while True:
        while j < len(expr) and expr[j] in " \t\n,":
            j += 1
        if j < len(expr) and expr[j] == "}":
            return matchers, j + 1
        found = _MATCHER.match(expr, j)
        if not found:
            raise ValueError(f"bad label matcher at {expr[j : j + 30]!r}")
        j = found.end()
        if j >= len(expr) or expr[j] not in "\"'`":
            raise ValueError(f"label matcher without a string at {expr[j : j + 30]!r}")
        value, j = _read_string(expr, j)
        matchers.append((found.group(1), found.group(2), value))


def _tokens(expr: str) -> Iterator[tuple[str, Any]]:
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch.isspace():
            i += 1
        elif ch in "\"'`":
            value, i = _read_string(expr, i)
            yield "string", value
        elif ch == "{":
            matchers, i = _read_matchers(expr, i)
            yield "matchers", matchers
        elif ch == "[":
            end = expr.index("]", i)
            yield "range", expr[i + 1 : end]
            i = end + 1
        elif ch.isdigit() or (ch == "." and expr[i + 1 : i + 2].isdigit()):
            number = _NUMBER.match(expr, i)
            assert number is not None
            yield "number", number.group()
            i = number.end()
        elif found := _IDENT.match(expr, i):
            yield "ident", found.group()
            i = found.end()
        else:
            yield "punct", ch
            i += 1


def selectors(expr: str) -> list[tuple[str, list[Matcher]]]:
    """The vector selectors of a PromQL expression: (metric name, label matchers)."""
    tokens = list(_tokens(expr))
    found: list[tuple[str, list[Matcher]]] = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else ("end", None)
        if kind == "matchers":
            raise ValueError(f"selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
            continue
        if value in _GROUPING:
            # `by (a, b)` lists labels, not series; `group_left` may stand without a list.
            if after == ("punct", "("):
                i = next(k for k in range(i, len(tokens)) if tokens[k] == ("punct", ")")) + 1
            else:
                i += 1
            continue
        if value in _KEYWORDS or after == ("punct", "(") or value in _AGGREGATIONS:
            i += 1
            continue
        if after[0] == "matchers":
            found.append((value, after[1]))
            i += 2
        else:
            found.append((value, []))
            i += 1
    return found


def test_selector_scanner_finds_metrics_and_matchers() -> None:
    """The scanner skips functions, grouping labels, strings and durations."""
    expr = (
        'sum by (job, code) (rate(sae_rollback_api_calls_total{code=~`A\\..+|B`, job="x"}[5m]))'
        " / on (job) group_left max without (instance) (up offset 1h) > bool 0.25e1"
    )
    assert selectors(expr) == [
        ("sae_rollback_api_calls_total", [("code", "=~", "A\\..+|B"), ("job", "=", "x")]),
        ("up", []),
    ]


def test_selector_scanner_rejects_nameless_selectors() -> None:
    """A selector without a metric name (``{__name__=~...}``) cannot be checked, so it fails."""
    with pytest.raises(ValueError, match="without a metric name"):
        selectors('rate({__name__=~"sae_.*"}[5m])')


def unknown_references(expr: str, series: Mapping[str, frozenset[str]]) -> list[str]:
    """Metric names, label names and closed-set label values that ``expr`` gets wrong."""
    problems: list[str] = []
    for name, matchers in selectors(expr):
        if name in PROMETHEUS_SERIES:
            labels: frozenset[str] = frozenset()
        elif name in series:
            labels = series[name]
        else:
            problems.append(f"unknown metric {name}")
            continue
        for label, op, value in matchers:
            if label not in labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            elif label in KNOWN_LABEL_VALUES and label in labels:
                alternatives = value.split("|") if op in ("=~", "!~") else [value]
                for alternative in alternatives:
                    if re.fullmatch(r"[a-z_]+", alternative) and (
                        alternative not in KNOWN_LABEL_VALUES[label]
                    ):
                        problems.append(f'{name}{{{label}{op}"{value}"}}: no such {label}')
    return problems


def test_unknown_references_catch_typos() -> None:
    """A misspelt metric, a foreign label and an impossible status are all reported."""
    series = exposed_series()
    assert unknown_references('sae_rollback_jobs{status="waiting"}', series) == []
    assert unknown_references("rate(sae_rollback_api_call_total[5m])", series) == [
        "unknown metric sae_rollback_api_call_total"
    ]
    assert unknown_references('sae_rollback_jobs{app_id="x"}', series) == [
        "sae_rollback_jobs has no label app_id"
    ]
    assert unknown_references('sae_rollback_jobs{status=~"waiting|stuck"}', series) == [
        'sae_rollback_jobs{status=~"waiting|stuck"}: no such status'
    ]


# ---------------------------------------------------------------------------------------
# Loading the artifacts
# ---------------------------------------------------------------------------------------


# libyaml's loader when PyYAML was built with it: the pure-Python one is ten times slower.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)


def load_yaml_all(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    return [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "sae-rollback.json").read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in panels if p["type"] != "row"]


_GRAFANA_INTERVALS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b")
_GRAFANA_VARIABLE = re.compile(r"\$\{?[A-Za-z_]\w*\}?")


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Prometheus would receive it."""
    expr = _GRAFANA_INTERVALS.sub("5m", expr)
    return _GRAFANA_VARIABLE.sub(".+", expr)


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, variables substituted."""
    return [grafana_to_promql(t["expr"]) for p in dashboard_panels() for t in p["targets"]]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with an empty environment: the defaults."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def sae_rollback_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the sae-rollback image."""
    return {
        name: interpolate(svc)
        for name, svc in compose()["services"].items()
        if svc.get("image", "").startswith("sae-rollback")
    }


def k8s_objects() -> list[dict[str, Any]]:
    """Every object kustomization.yaml deploys."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_all(K8S / name)]


def k8s(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def k8s_secret_example() -> dict[str, str]:
    data: dict[str, str] = load_yaml(K8S / "secret.example.yaml")["stringData"]
    return data


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def parse_cli(argv: list[str]) -> Any:
    """Parse ``argv`` with the real CLI parser (exits 2 on an unknown command or option)."""
    return cli._build_parser().parse_args(argv)


def config_env_names(settings: Settings) -> set[str]:
    """Every environment variable ``orchestrator.config`` reads for ``settings``."""
    names = {f"{ENV_PREFIX}CONFIG"}
    for section in dataclasses.fields(Settings):
        if section.name == "sources":
            continue
        for key in dataclasses.fields(type(section.default)):
            names.add(f"{ENV_PREFIX}{section.name}_{key.name}".upper())
    for source in settings.sources:
        env_name = source.upper().replace("-", "_")
        names |= {
            f"{ENV_PREFIX}SOURCE_{env_name}_TOKEN",
            f"{ENV_PREFIX}SOURCE_{env_name}_HMAC_SECRET",
        }
    return names


def assert_known_env(env: Mapping[str, str], settings: Settings, where: str) -> None:
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - config_env_names(settings)
    assert not unknown, f"{where}: environment variables no config key reads: {sorted(unknown)}"


# ---------------------------------------------------------------------------------------
# Alert rules
# ---------------------------------------------------------------------------------------


def test_alert_rules_name_only_exposed_metrics() -> None:
    """Every alert expression selects series the service exposes (or `up`)."""
    series = exposed_series()
    problems = {r["alert"]: unknown_references(r["expr"], series) for r in alert_rules()}
    assert {alert: p for alert, p in problems.items() if p} == {}


def test_alert_rules_cover_what_operators_page_on() -> None:
    """The alerts the issue asks for exist, each with severity, summary, description, runbook."""
    rules = {r["alert"]: r for r in alert_rules()}
    assert len(rules) == len(alert_rules()), "duplicate alert names"
    required = {
        "SaeRollbackFailed",
        "SaeRollbackJobsStuckWaiting",
        "SaeRollbackQueueAgeRising",
        "SaeRollbackSaeErrorRate",
        "SaeRollbackSaeCredentialsRejected",
        "SaeRollbackDown",
    }
    assert required <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name


def test_every_alert_has_a_runbook_section_in_the_docs() -> None:
    """Each `runbook` annotation points at a heading of README.md."""
    anchors = _anchors(DOCS.read_text())
    for rule in alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == DOCS.relative_to(REPO).as_posix()
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"no heading for {rule['alert']} in {DOCS.name}"


def test_the_docs_links_to_their_own_sections_resolve() -> None:
    """Every `[text](#anchor)` of README.md names one of its headings."""
    text = DOCS.read_text()
    anchors = _anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links, "no section links found: is the pattern still right?"
    assert sorted(set(links) - anchors) == []


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of every heading outside fenced code blocks (repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.+)$", line)
        if match:
            anchor = _anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(f"{anchor}-{count}" if count else anchor)
    return anchors


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts_test.yml has, for every alert, a case where it fires and one where it must not."""
    tests = load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def _code_regexes(expr: str, op: str) -> set[str]:
    return {
        v for _, matchers in selectors(expr) for lbl, o, v in matchers if (lbl, o) == ("code", op)
    }


def test_credentials_alert_matches_config_problems_only() -> None:
    """The credentials alert catches signature, key, token and RAM codes, nothing transient."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "SaeRollbackSaeCredentialsRejected"]
    (pattern,) = _code_regexes(rule["expr"], "=~")
    config_problems = {
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.MismatchWithAccessKey",
        "InvalidTimeStamp.Expired",
        "Forbidden.RAM",
        "Resouce.no.permission",
        "InvalidCredentials",
    }
    # The codes above are ones the client knows as permanent; the alert must follow its list.
    assert config_problems - {"InvalidCredentials"} <= PERMANENT_CODES
    assert {c for c in config_problems if not re.fullmatch(pattern, c)} == set()
    transient = BUSY_CODES | NOT_RUNNING_CODES | {CODE_SUCCESS, CODE_TRANSPORT}
    others = {"Throttling.User", "InvalidChangeOrder.NotFound", "ServiceUnavailable"}
    assert {c for c in transient | others if re.fullmatch(pattern, c)} == set()


def test_error_rate_alert_ignores_exactly_the_expected_answers() -> None:
    """The error-rate alert excludes Success, busy and not-running codes: the normal course."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "SaeRollbackSaeErrorRate"]
    patterns = _code_regexes(rule["expr"], "!~")
    assert len(patterns) == 1, "numerator and volume guard must exclude the same codes"
    (pattern,) = patterns
    expected = BUSY_CODES | NOT_RUNNING_CODES | {CODE_SUCCESS}
    assert {c for c in expected if not re.fullmatch(pattern, c)} == set()
    errors = {CODE_TRANSPORT, "Throttling.User", "InternalError", "SignatureDoesNotMatch"}
    assert {c for c in errors if re.fullmatch(pattern, c)} == set()


def test_prometheus_rule_carries_the_same_groups_as_alerts_yml() -> None:
    """deploy/kubernetes/prometheusrule.yaml is alerts.yml for the Prometheus Operator."""
    rule = k8s("PrometheusRule", "sae-rollback")
    assert rule["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]


# ---------------------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------------------


def test_dashboard_queries_name_only_exposed_metrics() -> None:
    """Every dashboard query and variable selects series the service exposes."""
    series = exposed_series()
    problems = {q: unknown_references(q, series) for q in dashboard_queries()}
    assert {q: p for q, p in problems.items() if p} == {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            (metric,) = re.findall(r"label_values\((\w+)\s*,", query)
            assert metric in series, f"variable {variable['name']}: unknown metric {metric}"


def test_dashboard_shows_every_metric() -> None:
    """Each metric family of the contract appears on at least one panel."""
    used = {name for q in dashboard_queries() for name, _ in selectors(q)}
    families = {f.name for f in Metrics(CollectorRegistry()).registry.collect()}
    missing = {f for f in families if not any(u.startswith(f) for u in used)}
    assert missing == set()


def test_dashboard_panels_use_the_datasource_variable() -> None:
    """The dashboard imports anywhere: every panel and target uses ${datasource}."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == expected


def test_dashboard_layout_has_unique_ids_and_no_overlap() -> None:
    """Panel ids are unique and no two panels cover the same grid cell."""
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]
    assert dashboard()["uid"] == "sae-rollback"


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    """Jobs, finishes, SAE calls, latency, retries, queue age, first call and budget panels."""
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for words in (
        "jobs by status",
        "finished per minute by status",
        "sae calls per minute by action and code",
        "sae call latency p50 / p99",
        "retries per minute by reason",
        "oldest queued",
        "time to first sae call",
        "budget",
    ):
        assert words in titles
    (budget,) = [p for p in dashboard_panels() if "budget" in p["title"].lower()]
    used = {name for t in budget["targets"] for name, _ in selectors(grafana_to_promql(t["expr"]))}
    assert used == {"sae_rollback_api_calls_total", "sae_rollback_api_budget_per_minute"}


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    """The compose mounts put the dashboard where the provider reads, Prometheus where it is."""
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "sae-rollback.yml")["providers"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]
    mounts = dict(
        v.rsplit(":", 2)[:2]
        for v in compose()["services"]["grafana"]["volumes"]
        if v.startswith("./")
    )
    dashboard_target = mounts["./grafana/sae-rollback.json"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"


# ---------------------------------------------------------------------------------------
# docker-compose and the Prometheus scrape config
# ---------------------------------------------------------------------------------------


def compose_settings(service: dict[str, Any]) -> Settings:
    """The Settings a compose service would load: the mounted TOML plus its environment."""
    env = {k: str(v) for k, v in service["environment"].items()}
    config_path = env[f"{ENV_PREFIX}CONFIG"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in service["volumes"] if v.startswith("./"))
    (source,) = [s for s, target in mounts.items() if target == config_path]
    raw = tomllib.loads((DEPLOY / source).read_text())
    settings = parse_settings(raw, env=env, base_dir=DEPLOY)
    assert_known_env(env, settings, "docker-compose.yml")
    return settings


def test_compose_runs_the_documented_topology() -> None:
    """PostgreSQL, a one-shot migrate, one api, two workers, the simulator, Prometheus, Grafana."""
    services = sae_rollback_services()
    commands = {name: parse_cli(svc["command"]).command for name, svc in services.items()}
    assert commands == {
        "migrate": "migrate",
        "api": "api",
        "worker-1": "worker",
        "worker-2": "worker",
        "simulator": "simulate",
    }
    all_services = compose()["services"]
    assert {"postgres", "prometheus", "grafana"} <= set(all_services)
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-1", "worker-2"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_services_share_image_and_hardening() -> None:
    """Every sae-rollback service runs this version's image, read-only, non-root, no caps."""
    uid, gid = _dockerfile_ids()
    for name, svc in sae_rollback_services().items():
        assert svc["image"] == IMAGE, name
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        assert svc["read_only"] is True, name
        # The image's own user (the Dockerfile's UID/GID build args), stated explicitly.
        assert svc["user"] == f"{uid}:{gid}", name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert any(t.startswith("/tmp") for t in svc["tmpfs"]), name


def test_compose_config_parses_and_points_at_compose_services() -> None:
    """The mounted TOML plus env is a valid config naming the postgres and simulator services."""
    services = sae_rollback_services()
    settings = compose_settings(services["api"])
    for name, svc in services.items():
        assert compose_settings(svc) == settings, f"{name} loads a different configuration"
    assert settings.store.url.startswith("postgresql://")
    assert settings.store.url.split("@", 1)[1].startswith("postgres:5432/")
    assert set(settings.sources) == {"alertmanager", "grafana", "oncall"}
    host, port = settings.sae.endpoint.split(":")
    simulate = parse_cli(services["simulator"]["command"])
    assert host == "simulator"
    assert int(port) == simulate.port
    assert simulate.host == "0.0.0.0"
    assert settings.sae.protocol == "http"
    env = services["worker-1"]["environment"]
    assert env["ALIBABA_CLOUD_ACCESS_KEY_ID"] == simulate.access_key_id
    assert env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] == simulate.access_key_secret


def test_compose_ports_and_grace_periods_match_the_config() -> None:
    """The published API port is [server] port; stop_grace_period exceeds both drain graces."""
    services = sae_rollback_services()
    settings = compose_settings(services["api"])
    (published,) = services["api"]["ports"]
    assert published == f"127.0.0.1:{settings.server.port}:{settings.server.port}"
    for name, svc in services.items():
        grace = _seconds(svc["stop_grace_period"])
        assert grace > settings.worker.drain_grace_s, name
        assert grace > settings.server.shutdown_grace_s, name
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def _seconds(text: str) -> float:
    found = re.fullmatch(r"(\d+)(s|m)", text)
    assert found, text
    return float(found.group(1)) * (60 if found.group(2) == "m" else 1)


def test_prometheus_scrapes_every_api_and_worker_process() -> None:
    """prometheus.yml's sae-rollback targets are exactly compose's api/worker services."""
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sae-rollback"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    services = sae_rollback_services()
    port = compose_settings(services["api"]).server.port
    serving = {
        n
        for n, s in services.items()
        if parse_cli(s["command"]).command in {"api", "worker", "serve"}
    }
    assert targets == {f"{name}:{port}" for name in serving}
    mounts = dict(
        v.rsplit(":", 2)[:2]
        for v in compose()["services"]["prometheus"]["volumes"]
        if v.startswith("./")
    )
    assert mounts["./prometheus/alerts.yml"] in config["rule_files"]
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # The SaeRollbackDown alert selects this job name.
    down = next(r for r in alert_rules() if r["alert"] == "SaeRollbackDown")
    assert f'up{{job="{job["job_name"]}"}}' in down["expr"]


# ---------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            result.append((op.upper(), args.strip()))
    return result


def _dockerfile_ids() -> tuple[int, int]:
    args = dict(a.split("=", 1) for op, a in dockerfile_instructions() if op == "ARG" and "=" in a)
    return int(args["UID"]), int(args["GID"])


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in dockerfile_instructions():
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    """A slim Python 3.11 build stage, a runtime stage, a fixed non-root uid."""
    ins = dockerfile_instructions()
    froms = [a for op, a in ins if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    (base,) = [a for op, a in ins if op == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)
    assert any(op == "COPY" and a.startswith("--from=build ") for op, a in ins)
    uid, gid = _dockerfile_ids()
    assert uid != 0
    assert gid != 0
    assert ("USER", "${UID}:${GID}") in ins


def test_dockerfile_installs_the_locked_dependencies_and_the_package() -> None:
    """requirements.lock constrains the install of the package's own wheel."""
    run = " ".join(a for op, a in dockerfile_instructions() if op == "RUN")
    assert "pip wheel --no-deps" in run
    assert "--constraint requirements.lock" in run
    copied = " ".join(a for op, a in dockerfile_instructions() if op == "COPY")
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "orchestrator"):
        assert needed in copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!requirements.lock", "!orchestrator/"):
        assert needed in ignore


def test_dockerfile_runs_read_only_with_the_console_script() -> None:
    """No bytecode writes, data on a volume, port and entry point as the code defines them."""
    ins = dockerfile_instructions()
    env = _dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    settings = parse_settings({}, env=env)
    assert_known_env(env, settings, "Dockerfile")
    assert settings.server.host == "0.0.0.0"
    assert ("EXPOSE", str(settings.server.port)) in ins
    assert ("VOLUME", '["/var/lib/sae-rollback"]') in ins
    assert ("WORKDIR", "/var/lib/sae-rollback") in ins
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = [json.loads(a) for op, a in ins if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(a) for op, a in ins if op == "CMD"]
    assert entry == ["sae-rollback"]
    assert "sae-rollback" in scripts
    assert parse_cli(cmd).command == "serve"
    assert ("STOPSIGNAL", "SIGTERM") in ins


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = [a for op, a in dockerfile_instructions() if op == "HEALTHCHECK"]
    exec_form = healthcheck.split(" CMD ", 1)[1]
    argv: list[str] = json.loads(exec_form)
    return argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _run_healthcheck(port: int) -> int:
    argv = _healthcheck_argv()
    assert argv[0] == "python"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SAE_ROLLBACK_SERVER_PORT": str(port),
        # A proxy that does not exist: the probe must bypass it to reach loopback.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), timeout=30)


async def test_dockerfile_healthcheck_probes_healthz_on_the_configured_port() -> None:
    """The HEALTHCHECK command succeeds on a 200 from /healthz and fails on a 503."""
    healthy = True

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=200 if healthy else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        assert await _run_healthcheck(port) == 0
        healthy = False
        assert await _run_healthcheck(port) != 0
    finally:
        await runner.cleanup()
    assert await _run_healthcheck(port) != 0, "nothing listening must fail too"


# ---------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml deploys every manifest except the example Secret and the patch."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")}
    optional = {"kustomization.yaml", "secret.example.yaml", "rrsa-without-webhook.patch.yaml"}
    assert set(kustomization["resources"]) == files - optional
    (image,) = kustomization["images"]
    assert f"{image['name']}:{image['newTag']}" == IMAGE
    assert "rrsa-without-webhook.patch.yaml" in (K8S / "kustomization.yaml").read_text()


def k8s_settings(tmp_path: Path, pod_spec: dict[str, Any]) -> Settings:
    """The Settings a pod would load: the ConfigMap's TOML, its env, the Secret's files."""
    (ctr,) = pod_spec["containers"]
    env = {e["name"]: e for e in ctr["env"]}
    config_path = Path(env[f"{ENV_PREFIX}CONFIG"]["value"])
    mounts = {m["name"]: m["mountPath"] for m in ctr["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    (config_volume,) = [n for n, p in mounts.items() if Path(p) == config_path.parent]
    config_map = k8s("ConfigMap", volumes[config_volume]["configMap"]["name"])
    text = config_map["data"][config_path.name]
    secret = k8s_secret_example()
    (secret_volume,) = [n for n, v in volumes.items() if "secret" in v]
    secret_dir = mounts[secret_volume]
    assert (
        volumes[secret_volume]["secret"]["secretName"]
        == load_yaml(K8S / "secret.example.yaml")["metadata"]["name"]
    )
    # Materialise the Secret's items where the pod would see them, and point the config there.
    for item in volumes[secret_volume]["secret"]["items"]:
        (tmp_path / item["path"]).write_text(secret[item["key"]] + "\n")
    referenced = re.findall(r'_file\s*=\s*"([^"]+)"', text)
    assert referenced, "the sources read their secrets from files"
    for path in referenced:
        assert Path(path).parent == Path(secret_dir), f"{path} is not on the Secret mount"
    text = text.replace(f"{secret_dir}/", f"{tmp_path}/")
    plain_env: dict[str, str] = {}
    for name, entry in env.items():
        if "value" in entry:
            plain_env[name] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            plain_env[name] = secret[ref["key"]]
    settings = parse_settings(tomllib.loads(text), env=plain_env, base_dir=tmp_path)
    assert_known_env(plain_env, settings, "kubernetes")
    return settings


@pytest.mark.parametrize(
    ("name", "command"),
    [("sae-rollback-api", "api"), ("sae-rollback-worker", "worker")],
)
def test_k8s_deployments_run_the_image_command_and_config(
    tmp_path: Path, name: str, command: str
) -> None:
    """Image, CLI command, ports and probes of a Deployment match the code and its config."""
    deployment = k8s("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    ctr = container(deployment)
    assert ctr["image"] == IMAGE
    assert parse_cli(ctr["args"]).command == command
    settings = k8s_settings(tmp_path, pod)
    assert settings.server.host == "0.0.0.0"
    (port,) = ctr["ports"]
    assert (port["name"], port["containerPort"]) == ("http", settings.server.port)
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert ctr["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    pre_stop = 5 if "lifecycle" in ctr else 0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.worker.drain_grace_s + pre_stop
    assert grace > settings.server.shutdown_grace_s + pre_stop
    assert any(v.get("emptyDir") is not None for v in pod["volumes"] if v["name"] == "tmp")
    assert {"name": "tmp", "mountPath": "/tmp"} in ctr["volumeMounts"]


def test_k8s_migrate_job_runs_migrate_with_the_same_config(tmp_path: Path) -> None:
    """The migrate Job uses the image, the config and the restricted context of the pods."""
    job = k8s("Job", "sae-rollback-migrate")
    pod = job["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["image"] == IMAGE
    assert parse_cli(ctr["args"]).command == "migrate"
    assert k8s_settings(tmp_path, pod).store.url.startswith("postgresql://")
    _assert_restricted(pod, ctr, "migrate")


def _assert_restricted(pod: dict[str, Any], ctr: dict[str, Any], where: str) -> None:
    uid, gid = _dockerfile_ids()
    pod_ctx, ctx = pod["securityContext"], ctr["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True, where
    assert ctx["runAsNonRoot"] is True, where
    assert (pod_ctx["runAsUser"], pod_ctx["runAsGroup"]) == (uid, gid), where
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert ctx["readOnlyRootFilesystem"] is True, where
    assert ctx["allowPrivilegeEscalation"] is False, where
    assert ctx["capabilities"] == {"drop": ["ALL"]}, where
    assert pod["automountServiceAccountToken"] is False, where


def test_k8s_pods_use_the_restricted_security_context() -> None:
    """runAsNonRoot with the image's uid, read-only root, no privilege escalation, no caps."""
    for name in ("sae-rollback-api", "sae-rollback-worker"):
        deployment = k8s("Deployment", name)
        _assert_restricted(deployment["spec"]["template"]["spec"], container(deployment), name)


def test_k8s_secret_references_exist_in_the_example_secret() -> None:
    """Every secretKeyRef and Secret volume item names a key of secret.example.yaml."""
    keys = set(k8s_secret_example())
    used: set[str] = set()
    for obj in k8s_objects():
        if obj["kind"] not in {"Deployment", "Job"}:
            continue
        pod = obj["spec"]["template"]["spec"]
        for ctr in pod["containers"]:
            for entry in ctr.get("env", []):
                if "valueFrom" in entry:
                    used.add(entry["valueFrom"]["secretKeyRef"]["key"])
        for volume in pod["volumes"]:
            used |= {item["key"] for item in volume.get("secret", {}).get("items", [])}
    assert used == keys


def _pod_labels(name: str, kind: str = "Deployment") -> dict[str, str]:
    labels: dict[str, str] = k8s(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_select_the_right_pods() -> None:
    """The API Service reaches api pods only; the metrics Service every api and worker pod."""
    api, worker = _pod_labels("sae-rollback-api"), _pod_labels("sae-rollback-worker")
    migrate = _pod_labels("sae-rollback-migrate", "Job")
    for name, deployment in (("sae-rollback-api", api), ("sae-rollback-worker", worker)):
        selector = k8s("Deployment", name)["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment)
    service = k8s("Service", "sae-rollback")
    assert _selects(service["spec"]["selector"], api)
    assert not _selects(service["spec"]["selector"], worker)
    metrics = k8s("Service", "sae-rollback-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert _selects(metrics["spec"]["selector"], api)
    assert _selects(metrics["spec"]["selector"], worker)
    assert not _selects(metrics["spec"]["selector"], migrate)
    for svc in (service, metrics):
        (port,) = svc["spec"]["ports"]
        assert port["targetPort"] == "http"
        assert (
            port["port"]
            == container(k8s("Deployment", "sae-rollback-api"))["ports"][0]["containerPort"]
        )


def test_k8s_service_monitor_scrapes_metrics_as_job_sae_rollback() -> None:
    """The ServiceMonitor selects the metrics Service, scrapes /metrics, sets job=sae-rollback."""
    monitor = k8s("ServiceMonitor", "sae-rollback")
    metrics = k8s("Service", "sae-rollback-metrics")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert not _selects(
        monitor["spec"]["selector"]["matchLabels"],
        k8s("Service", "sae-rollback")["metadata"]["labels"],
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == metrics["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    job = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    assert job == [{"action": "replace", "targetLabel": "job", "replacement": "sae-rollback"}]


def test_k8s_disruption_budgets_cover_both_deployments() -> None:
    """One PodDisruptionBudget per Deployment, selecting its pods."""
    for name in ("sae-rollback-api", "sae-rollback-worker"):
        pdb = k8s("PodDisruptionBudget", name)
        assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(name))
    assert k8s("PodDisruptionBudget", "sae-rollback-api")["spec"]["minAvailable"] >= 1


def test_k8s_only_workers_get_the_rrsa_role() -> None:
    """Workers: RRSA injection label and a role-annotated ServiceAccount; API pods: neither."""
    worker = k8s("Deployment", "sae-rollback-worker")["spec"]["template"]
    api = k8s("Deployment", "sae-rollback-api")["spec"]["template"]
    label = "pod-identity.alibabacloud.com/injection"
    # Quoted in YAML: an unquoted `on` would be the boolean true, which the webhook ignores.
    assert worker["metadata"]["labels"][label] == "on"
    assert label not in api["metadata"]["labels"]
    worker_sa = k8s("ServiceAccount", worker["spec"]["serviceAccountName"])
    api_sa = k8s("ServiceAccount", api["spec"]["serviceAccountName"])
    assert worker_sa["metadata"]["annotations"]["pod-identity.alibabacloud.com/role-name"]
    assert "annotations" not in api_sa["metadata"]
    for ctr in (
        container(k8s("Deployment", "sae-rollback-worker")),
        container(k8s("Deployment", "sae-rollback-api")),
    ):
        assert not [e for e in ctr["env"] if e["name"].startswith("ALIBABA_CLOUD_ACCESS_KEY")]


def test_rrsa_patch_provides_the_credential_chain_variables() -> None:
    """The no-webhook patch sets the three RRSA variables and mounts the OIDC token they name."""
    patch = load_yaml(K8S / "rrsa-without-webhook.patch.yaml")
    worker = k8s("Deployment", "sae-rollback-worker")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", worker["metadata"]["name"])
    (ctr,) = patch["spec"]["template"]["spec"]["containers"]
    assert ctr["name"] == container(worker)["name"]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert set(env) == {
        "ALIBABA_CLOUD_ROLE_ARN",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
    }
    role = k8s("ServiceAccount", "sae-rollback-worker")["metadata"]["annotations"]
    assert env["ALIBABA_CLOUD_ROLE_ARN"].endswith(
        f":role/{role['pod-identity.alibabacloud.com/role-name']}"
    )
    assert env["ALIBABA_CLOUD_OIDC_PROVIDER_ARN"].startswith("acs:ram::")
    (mount,) = ctr["volumeMounts"]
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert mount["name"] == volume["name"]
    assert env["ALIBABA_CLOUD_OIDC_TOKEN_FILE"] == f"{mount['mountPath']}/{token['path']}"
    assert token["audience"] == "sts.aliyuncs.com"
    label = patch["spec"]["template"]["metadata"]["labels"][
        "pod-identity.alibabacloud.com/injection"
    ]
    assert label == "off"


# ---------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------


def systemd_unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as {section: {key: [values in order]}} (keys may repeat)."""
    unit: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (DEPLOY / "systemd" / "sae-rollback.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        unit[section].setdefault(key, []).append(value)
    return unit


def test_systemd_unit_runs_serve_and_outlasts_the_drain() -> None:
    """ExecStart is a CLI command; SIGTERM, and a stop timeout above both grace periods."""
    service = systemd_unit()["Service"]
    (exec_start,) = service["ExecStart"]
    binary, *argv = shlex.split(exec_start)
    assert binary.endswith("/bin/sae-rollback")
    assert parse_cli(argv).command == "serve"
    defaults = Settings()
    (timeout,) = service["TimeoutStopSec"]
    assert _seconds(timeout) > max(defaults.worker.drain_grace_s, defaults.server.shutdown_grace_s)
    assert service["KillSignal"] == ["SIGTERM"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert_known_env(env, defaults, "sae-rollback.service")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env[f"{ENV_PREFIX}CONFIG"].startswith("/etc/sae-rollback/")


def test_systemd_unit_is_hardened() -> None:
    """The hardening options the issue names are set."""
    service = systemd_unit()["Service"]
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "StateDirectory": "sae-rollback",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ProtectKernelTunables": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {k: service.get(k, ["<unset>"])[-1] for k in expected} == expected
    (workdir,) = service["WorkingDirectory"]
    assert workdir == "/var/lib/" + service["StateDirectory"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd itself reports no unknown keys or bad values in the unit."""
    text = (DEPLOY / "systemd" / "sae-rollback.service").read_text()
    # verify insists that ExecStart's binary exists; the real one lives in /opt after install.
    unit = tmp_path / "sae-rollback.service"
    unit.write_text(
        text.replace("/opt/sae-rollback/bin/sae-rollback", shutil.which("true") or "/bin/true")
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    noise = re.compile(r"(Failed to connect to bus|not running as a system|/run/systemd/system)")
    complaints = [line for line in result.stderr.splitlines() if line and not noise.search(line)]
    assert complaints == []
    assert result.returncode == 0


# ---------------------------------------------------------------------------------------
# RAM policy
# ---------------------------------------------------------------------------------------


def sae_actions_called() -> set[str]:
    """Every SAE action the client sends, read from the client's source (``self._call(X, ...)``)."""
    from orchestrator.sae import client

    source = Path(client.__file__).read_text()
    actions = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "_call"
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            actions.add(getattr(client, node.args[0].id))
    return actions


def test_ram_policy_grants_exactly_the_actions_the_client_calls() -> None:
    """Least privilege: one Allow statement with the client's SAE actions on Resource "*"."""
    assert sae_actions_called() == {
        "AbortAndRollbackChangeOrder",
        "DescribeChangeOrder",
        "ListChangeOrders",
        "DescribeApplicationStatus",
    }
    policy = json.loads((DEPLOY / "ram-policy.json").read_text())
    assert policy["Version"] == "1"
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow"
    # AbortAndRollbackChangeOrder has no resource-level authorization (sae-api.md §1).
    assert statement["Resource"] == "*"
    assert sorted(statement["Action"]) == sorted(f"sae:{a}" for a in sae_actions_called())


# ---------------------------------------------------------------------------------------
# README.md (the operations section)
# ---------------------------------------------------------------------------------------


def _config_rows() -> list[tuple[str, str, str, str]]:
    """(section, key, default, env) for every key of orchestrator.config, sources included."""
    rows = []
    for section in dataclasses.fields(Settings):
        if section.name == "sources":
            continue
        for key in dataclasses.fields(type(section.default)):
            env = f"{ENV_PREFIX}{section.name}_{key.name}".upper()
            rows.append((section.name, key.name, _toml(key.default), env))
    for key in dataclasses.fields(SourceSettings):
        if key.name == "name":
            continue
        default = (
            "" if key.default is dataclasses.MISSING or key.default is None else _toml(key.default)
        )
        env = ""
        if key.name in {"token", "hmac_secret"}:
            env = f"{ENV_PREFIX}SOURCE_<NAME>_{key.name.upper()}"
        rows.append(("sources.<name>", key.name, default, env))
        if key.name in {"token", "password", "hmac_secret"}:
            rows.append(("sources.<name>", f"{key.name}_file", "", ""))
    return rows


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_operations_doc_lists_every_config_key_with_default_and_env() -> None:
    """README.md has a row per config key with the code's default and env override."""
    table = {}
    for line in DOCS.read_text().splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if len(cells) >= 4 and cells[0].startswith("`["):
            table[(cells[0], cells[1])] = (cells[2], cells[3])
    missing, wrong = [], []
    for section, key, default, env in _config_rows():
        found = table.get((f"`[{section}]`", f"`{key}`"))
        if found is None:
            missing.append(f"| `[{section}]` | `{key}` | `{default}` | `{env}` |")
        elif found != (f"`{default}`" if default else "", f"`{env}`" if env else ""):
            wrong.append(f"[{section}] {key}: doc says {found}, code says ({default!r}, {env!r})")
    assert missing == [], "add these rows to README.md:\n" + "\n".join(missing)
    assert wrong == []


def test_operations_doc_names_the_deploy_files_and_the_docker_caveat() -> None:
    """The operations doc points at each deploy artifact and says Docker was not run here."""
    text = DOCS.read_text()
    for path in (
        "deploy/Dockerfile",
        "deploy/docker-compose.yml",
        "deploy/kubernetes/",
        "deploy/systemd/sae-rollback.service",
        "deploy/ram-policy.json",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/sae-rollback.json",
    ):
        assert path in text, path
    assert "no Docker engine" in text
    for header in (
        "X-Grafana-Alert-Signature",
        "_aliyun_arms_",
        "send_resolved",
        "webhook_configs",
    ):
        assert header in text, header


def test_operations_doc_describes_every_exposed_metric() -> None:
    """The doc's metric table names every series family a Metrics registry exposes."""
    text = DOCS.read_text()
    for family in Metrics(CollectorRegistry()).registry.collect():
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"| `{exposed}` | {family.type} |" in text, exposed


# ---------------------------------------------------------------------------------------
# Probe and scrape paths against the HTTP app the code serves
# ---------------------------------------------------------------------------------------


def deploy_http_paths() -> set[str]:
    """Every path a deploy file sends an HTTP GET to: probes, healthchecks, scrapes."""
    paths: set[str] = set()
    for obj in k8s_objects():
        if obj["kind"] == "Deployment":
            ctr = container(obj)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                paths.add(ctr[probe]["httpGet"]["path"])
        if obj["kind"] == "ServiceMonitor":
            paths |= {e["path"] for e in obj["spec"]["endpoints"]}
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sae-rollback"]
    paths.add(job["metrics_path"])
    paths |= set(re.findall(r"/healthz|/readyz", " ".join(_healthcheck_argv())))
    return paths


async def test_probe_and_scrape_paths_are_routes_of_the_service(tmp_path: Path) -> None:
    """/healthz, /readyz, /metrics and the webhook URL the docs give are GET routes of the app."""
    from orchestrator.intake import build_intake_app
    from orchestrator.store import open_store

    settings = k8s_settings(
        tmp_path, k8s("Deployment", "sae-rollback-api")["spec"]["template"]["spec"]
    )
    store = open_store(f"sqlite:///{tmp_path / 'routes.db'}")  # constructed only, never opened
    app = build_intake_app(
        store,
        Metrics(CollectorRegistry()),
        settings.sources,
        max_body_bytes=settings.server.max_body_bytes,
        default_region=settings.sae.region,
    )
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    wanted = deploy_http_paths()
    assert wanted == {"/healthz", "/readyz", "/metrics"}
    assert {("GET", path) for path in wanted} <= routes
    assert ("POST", "/v1/webhooks/{source}") in routes
    assert "/v1/webhooks/<source>" in DOCS.read_text()
