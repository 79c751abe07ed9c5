"""The Grafana dashboards of deploy/grafana and the rules of deploy/prometheus, against a real
Prometheus scraping the session's services and gateway: no panel ships a broken query.

Every panel's query (and every template variable's) is sent to Prometheus' HTTP API with
Grafana's variables replaced as Grafana would; a query Prometheus refuses fails the test
with its reason. The names the dashboards read are held to the metrics the services
declare and the series the rules record, so a misspelt metric (which Prometheus would
answer with nothing, not an error) fails too.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.local.prometheus import RULES_DIR, PrometheusError, query
from services.runtime import metrics

DASHBOARDS = sorted((Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards").glob("*.json"))
#: Grafana's built-in variables, as Grafana would fill them for a recent time range.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
#: The per-tenant dashboard's variable: any tenant id does (no series is not an error).
TENANT = "tenant_a"


def _dashboard(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield from _panels(panel) if panel["type"] == "row" and panel.get("panels") else ()
        if panel["type"] != "row":
            yield panel


def _queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in _panels(board):
        for target in panel["targets"]:
            yield f"{board['title']} / {panel['title']} / {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            # Grafana's label_values(metric, label) is its own function: what it asks Prometheus.
            found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
            assert found, f"{board['title']}: variable {variable['name']} is not label_values(metric, label)"
            yield f"{board['title']} / variable {variable['name']}", f"count by ({found[2]}) ({found[1]})"


def _filled(expr: str) -> str:
    values = {**GRAFANA_VARIABLES, "tenant": TENANT}

    def fill(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)


def _declared_metric_names() -> set[str]:
    """Every series name the services expose, from services/runtime/metrics.py."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"{metric._name}{suffix}" for metric in metrics.ALL for suffix in suffixes[str(metric._type)]}


def _recorded_names() -> set[str]:
    return {name for path in RULES_DIR.glob("*.yml") for name in re.findall(r"- record: (\S+)", path.read_text())}


def test_there_is_a_platform_overview_and_a_per_tenant_dashboard_with_a_tenant_variable() -> None:
    boards = {_dashboard(path)["uid"]: _dashboard(path) for path in DASHBOARDS}
    assert set(boards) == {"towerco-platform", "towerco-tenant"}, set(boards)
    tenant = boards["towerco-tenant"]
    assert "tenant" in {variable["name"] for variable in tenant["templating"]["list"]}
    # Every series of a tenant's own is filtered by the variable: the view never mixes tenants.
    for where, expr in _queries(tenant):
        if "variable" not in where:
            assert '="$tenant"' in expr, f"{where} does not select the tenant: {expr}"
    titles = " ".join(panel["title"].lower() for panel in _panels(tenant))
    for topic in ("calls", "errors", "latency", "refus", "database time", "burn"):
        assert topic in titles, f"the tenant dashboard has no panel on {topic}"


def test_the_dashboards_read_only_declared_metrics_and_recorded_series() -> None:
    declared, recorded = _declared_metric_names(), _recorded_names()
    for path in DASHBOARDS:
        for where, expr in _queries(_dashboard(path)):
            for name in re.findall(r"(?<![\w:])towerco_\w+", expr):
                assert name in declared, f"{where}: {name} is not a metric the services declare"
            for name in re.findall(r"\b\w+:\w+:\w+\b", expr):
                assert name in recorded, f"{where}: {name} is not a series deploy/prometheus/rules records"


def test_every_panel_query_evaluates_on_the_running_prometheus(prometheus: str) -> None:
    failures = []
    count = 0
    for path in DASHBOARDS:
        for where, expr in _queries(_dashboard(path)):
            count += 1
            try:
                query(prometheus, _filled(expr))
            except PrometheusError as exc:
                failures.append(f"{where}: {exc}")
    assert count >= 30, count
    assert not failures, "\n".join(failures)


def _rule_groups(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as reply:
        groups: list[dict[str, Any]] = json.loads(reply.read())["data"]["groups"]
    return groups


def test_the_recording_and_alert_rules_load_and_evaluate_on_the_running_prometheus(prometheus: str) -> None:
    recorded = _recorded_names()
    deadline = time.monotonic() + 10
    while True:
        groups = _rule_groups(prometheus)
        rules = [rule for group in groups for rule in group["rules"]]
        # Groups with their own (longer) interval may not have run yet; the others run every second.
        pending = [
            rule["name"]
            for group in groups
            if group["interval"] <= 1
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {rule["name"] for rule in rules if rule["type"] == "recording"} == recorded
    assert len([rule for rule in rules if rule["type"] == "alerting"]) >= 7
    errors = [f"{rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] == "err"]
    assert not errors, errors
    assert not pending, f"rules never evaluated: {pending}"
    # The rules of the slower groups, asked directly: their expressions evaluate too.
    for rule in rules:
        query(prometheus, rule["query"])
