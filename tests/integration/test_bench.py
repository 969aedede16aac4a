"""`fleet bench` with a tiny N and without the 100-agent part: one JSON
object with every figure, ratios that agree with the figures, nothing left
behind in Docker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import docker
import pytest
from support import FLEET

from fleet.cli.bench.run import PARTS
from fleet.cli.host import BENCH_PARTS
from fleet.container.spec import LABEL_NAMESPACE


def test_cli_offers_every_part() -> None:
    assert BENCH_PARTS == PARTS


def test_bench_reports_every_figure(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    done = subprocess.run([FLEET, "bench", "--tasks", "2", "--skip", "hundred", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    report = json.loads(done.stdout)

    rows = report["roundtrip"]
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    for row in rows.values():
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["tasks_per_s"] > 0
    ratios = report["ratios"]
    p50 = {key: row["p50_ms"] for key, row in rows.items()}
    assert ratios["d_p50_over_a"] == pytest.approx(p50["d"] / p50["a"])
    assert ratios["d_p50_over_b"] == pytest.approx(p50["d"] / p50["b"])
    assert ratios["c_p50_over_d"] == pytest.approx(p50["c"] / p50["d"])
    assert ratios["e_p50_over_d"] == pytest.approx(p50["e"] / p50["d"])

    cold = report["cold"]
    assert len(cold["cold_start_ms"]) == 3 and all(t > 0 for t in cold["cold_start_ms"])
    assert cold["idle_container_mib"] > 0

    through = report["throughput"]
    assert through["tasks"] >= 12
    for name in ("fleet_3x2_tasks_per_s", "bare6_cat_tasks_per_s", "bare6_noop_tasks_per_s"):
        assert through[name] > 0
    assert through["ratio_vs_cat"] == pytest.approx(
        through["fleet_3x2_tasks_per_s"] / through["bare6_cat_tasks_per_s"])
    assert through["ratio_vs_noop"] == pytest.approx(
        through["fleet_3x2_tasks_per_s"] / through["bare6_noop_tasks_per_s"])

    cli = report["cli"]
    assert 0 < cli["python_ms"] < cli["help_ms"] and cli["status_ms"] > 0

    egress = report["egress"]
    for path in ("direct", "proxy"):
        assert egress[path]["kept_p50_ms"] > 0 and egress[path]["fresh_p50_ms"] > 0
        assert egress[path]["requests_per_s"] > 0
    assert egress["kept_ratio"] == pytest.approx(
        egress["proxy"]["kept_p50_ms"] / egress["direct"]["kept_p50_ms"])

    metrics = report["metrics"]
    assert metrics["tasks"] == 400 and metrics["empty_p50_ms"] > 0
    assert 0 < metrics["p50_ms"] <= metrics["p95_ms"]
    assert metrics["ratio"] == pytest.approx(metrics["p50_ms"] / metrics["empty_p50_ms"])

    real = report["real-agent"]
    assert real["tasks"] == 3 and real["image_mb"] > 0
    for row in (real["claude_code"], real["git_alone"]):
        assert 0 < row["push_p50_ms"] <= row["push_max_ms"] and row["done_p50_ms"] > row["push_p50_ms"]
    assert real["claude_code"]["max_rss_mb"] > 0 and "max_rss_mb" not in real["git_alone"]
    assert real["push_ratio"] == pytest.approx(real["claude_code"]["push_p50_ms"]
                                               / real["git_alone"]["push_p50_ms"])

    assert "hundred" not in report
    goals = {goal["goal"]: goal["met"] for goal in report["goals"]}
    assert len(goals) == 7 and all(isinstance(met, bool) for met in goals.values())
    assert goals["`fleet --help` and `fleet status` start in ≤ 0.2 s"] == (
        max(cli["help_ms"], cli["status_ms"]) <= 200)
    assert goals["channel ≥ 10 x faster than exec per task"] == (ratios["c_p50_over_d"] >= 10)

    left = [c.name for c in docker_client.containers.list(
                all=True, filters={"label": LABEL_NAMESPACE}, ignore_removed=True)
            if c.labels.get(LABEL_NAMESPACE, "").startswith("bench-")]
    assert left == []
    volumes = [v.name for v in docker_client.volumes.list(filters={"label": LABEL_NAMESPACE})
               if (v.attrs.get("Labels") or {}).get(LABEL_NAMESPACE, "").startswith("bench-")]
    assert volumes == []
