"""`fleet demo`, the main job, from an empty directory: it brings up its own
Redis, runs every demo task to the state it expects, and cleans up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import docker
from support import FLEET, free_port


def test_demo_runs_and_cleans_up(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there
    done = subprocess.run([FLEET, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every task ended as expected" in done.stdout
    assert "started a private redis-server" in done.stdout
    for state in ("succeeded", "failed"):
        assert state in done.stdout
    left = docker_client.containers.list(all=True, filters={"label": "fleet.namespace=fleet-demo"})
    assert left == []
    assert (tmp_path / ".fleet/demo/worker.log").is_file()


def test_the_real_agent_demo_pushes_twice_and_cleans_up(tmp_path: Path,
                                                         docker_client: docker.DockerClient) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run([FLEET, "demo", "--real-agent"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every task ended as expected" in done.stdout
    assert "fleet: credential-failure token=forge" in done.stdout  # the revoked token's attempt
    assert "forge: fleet/demo-after-rotation → missing" not in done.stdout
    assert "submit → push" in done.stdout
    left = docker_client.containers.list(all=True, filters={"label": "fleet.namespace=fleet-demo-real"})
    assert left == []
    assert docker_client.networks.list(names=["fleet-demo-real-world"]) == []
