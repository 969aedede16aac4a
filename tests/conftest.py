"""Fixtures shared by every test: a real redis-server per session, a real
Docker engine, and a factory for a test's own fleet (namespace, secrets dir,
config, workers). Everything a test creates in Docker carries the label
fleet.namespace with this run's prefix; it is removed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from support import (
    Fleet,
    MakeFleet,
    RedisServer,
    build_fleet,
    remove_run_resources,
    start_redis,
)


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

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_fleet(request: pytest.FixtureRequest, redis_server: RedisServer,
               docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[MakeFleet]:
    """Factory: a fleet with its own namespace, secrets dir and config file."""
    made: list[Fleet] = []

    def make(agents: dict[str, dict[str, Any]], **top: Any) -> Fleet:
        fleet = build_fleet(redis_server.url, tmp_path, agents, **top)
        made.append(fleet)
        return fleet

    yield make
    failed = getattr(getattr(request.node, "report_call", None), "failed", False)
    for fleet in made:
        if failed:  # the workers' own account, for whoever reads the failure
            for n, worker in enumerate(fleet.workers):
                print(f"--- worker {n} of {fleet.settings.namespace} ---\n{''.join(worker.lines[-200:])}")
        fleet.tear_down(docker_client)
