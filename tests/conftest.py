"""Fixtures shared by every test: a real redis-server per session, a real
Docker engine, and a factory for a test's own fleet (namespace, secrets dir,
config, workers). Everything a test creates in Docker carries the label
fleet.namespace with this run's prefix; it is removed at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from support import (
    Fleet,
    MakeFleet,
    RedisServer,
    new_namespace,
    remove_run_resources,
    start_redis,
    write_config,
)

from fleet.container.spec import LABEL_NAMESPACE


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=120)
    client.ping()
    yield client
    remove_run_resources(client)

@pytest.fixture
def make_fleet(redis_server: RedisServer, docker_client: docker.DockerClient,
               tmp_path: Path) -> Iterator[MakeFleet]:
    """Factory: a fleet with its own namespace, secrets dir and config file."""
    made: list[Fleet] = []

    def make(agents: dict[str, dict[str, Any]], **top: Any) -> Fleet:
        namespace = new_namespace()
        secrets = tmp_path / f"secrets-{namespace}"
        raw = {"redis_url": redis_server.url, "namespace": namespace,
               "secrets_dir": str(secrets), "host_id": "testhost", **top, "agents": agents}
        config = tmp_path / f"fleet-{namespace}.toml"
        write_config(config, raw)
        from fleet.settings import load_settings

        os.environ["FLEET_CONFIG"] = str(config)
        try:
            settings = load_settings()
        finally:
            del os.environ["FLEET_CONFIG"]
        fleet = Fleet(settings, config)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        for worker in fleet.workers:
            worker.stop()
        for container in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_NAMESPACE}={fleet.settings.namespace}"}):
            container.remove(force=True)
        shutil.rmtree(fleet.settings.secrets_dir, ignore_errors=True)
