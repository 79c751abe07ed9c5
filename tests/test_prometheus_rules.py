"""The Prometheus rules of deploy/prometheus: valid, and every alert fires in a promtool test.

``promtool`` comes with Debian's ``prometheus`` package (``.ci/run`` installs it). The rule
tests themselves are the YAML files of deploy/prometheus/tests/: each feeds series in
which one tenant or service is in trouble and the others are not, and lists the alerts
expected then (an alert test fails on one too many as on one missing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from deploy.local.prometheus import PROMETHEUS_DIR, RULES_DIR, render_config

RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH (Debian: apt-get install prometheus; .ci/run does)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def _alert_names() -> list[str]:
    return [name for path in RULE_FILES for name in re.findall(r"^\s*- alert: (\w+)$", path.read_text(), re.M)]


def test_the_rule_files_are_valid() -> None:
    checked = _promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rendered_configuration_is_valid_and_loads_the_rules(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    ports = {"tenant": 9461, "sites": 9462, "features": 9463, "audit": 9464}
    config.write_text(render_config(ports, 9901, scrape_interval="1s"))
    checked = _promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for rules in RULE_FILES:
        assert f"Checking {rules}" in checked.stdout, checked.stdout


def test_every_alert_fires_in_a_promtool_test() -> None:
    alerts = _alert_names()
    assert len(alerts) >= 7, alerts
    tests = "\n".join(path.read_text() for path in RULE_TESTS)
    for alert in alerts:
        # An expectation of this alert with at least one firing instance (possibly through a YAML anchor).
        fires = rf"alertname: {alert}\n\s+exp_alerts:( &\w+)?\n\s+- exp_labels:"
        assert re.search(fires, tests), f"no promtool test expects {alert} to fire"


def test_the_promtool_rule_tests_pass() -> None:
    tested = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(RULE_TESTS), tested.stdout
