"""The alert rules and the Grafana dashboard in docs/monitoring/, checked
by Prometheus' own promtool (Debian's `prometheus` package): the rules
parse and each alert fires on its series in promtool's rule unit tests;
every dashboard query parses as PromQL (as a recording rule promtool
checks) and names only metrics `/metrics` exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import fakeredis
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet.client import FleetClient
from fleet.settings import FleetSettings
from fleet.web.metrics import FleetCollector

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}  # a family's series
MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def exposed_metrics() -> set[str]:
    """The names of the series /metrics serves (of an empty fleet: every
    family is described even without a sample)."""
    settings = FleetSettings.model_validate({"namespace": "t", "agents": {"dev": {}}})
    registry = CollectorRegistry()
    registry.register(FleetCollector(FleetClient(settings, fakeredis.FakeRedis(decode_responses=True))))
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def test_the_alert_rules_parse_and_fire_on_their_series() -> None:
    checked = promtool("check", "rules", "fleet-alerts.yml")
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stderr
    tested = promtool("test", "rules", "fleet-alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = yaml.safe_load((MONITORING / "fleet-alerts.yml").read_text())["groups"][0]["rules"]
    names = set(re.findall(r"fleet_[a-z_]+", " ".join(rule["expr"] for rule in rules)))
    assert names <= exposed_metrics(), names - exposed_metrics()


def test_every_dashboard_query_parses_and_names_metrics_fleet_exposes(tmp_path: Path) -> None:
    dashboard = json.loads((MONITORING / "fleet-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    # Grafana's variables, as Grafana would put them in.
    promql = [e.replace("$__rate_interval", "5m").replace("$agent", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"fleet_dashboard:panel_{n}", "expr": expr} for n, expr in enumerate(promql)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = set(re.findall(r"fleet_[a-z_]+", " ".join(exprs))) - {"fleet_dashboard"}
    assert names <= exposed_metrics(), names - exposed_metrics()
    # And a query that is not PromQL is what promtool refuses (the check is real).
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (agent (fleet_tasks)"}]}]}))
    assert promtool("check", "rules", "broken.yml", cwd=tmp_path).returncode != 0
