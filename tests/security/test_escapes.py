"""The adversarial suite: an agent that tries every escape a resourceful
agent would try, against real containers made by a real `fleet worker`.

Canaries are planted first — a `~/.claude.json` in the worker's own home,
another agent's token, secrets in the worker's environment, another agent's
running task's payload, a file on the host that a symlink in /state points
at — and no canary may appear anywhere the agent can see or write. Each probe
is its own test, so a regression names itself. Weakening one control in a
fixture makes the matching probe fail."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
from docker.types import Mount
from support import Fleet, RedisServer, build_fleet, wait_for_state

from fleet.container.spec import build_spec, container_name
from fleet.credentials.tokens import TokenStore
from fleet.record import State

PROBES_SOURCE = (Path(__file__).parent / "probes.py").read_text()
PROBE_NAMES = re.findall(r'^@probe\("([a-z0-9-]+)"\)', PROBES_SOURCE, re.M)
LAUNCHER = ("import json, sys; p = json.load(sys.stdin); code = p.pop('code'); "
            "sys.argv = ['probes', json.dumps(p)]; exec(compile(code, 'probes', 'exec'), {})")
HOSTILE = {"tokens": ["forge"], "command": ["python3", "-c", LAUNCHER], "memory": "256m",
           "pids_limit": 64, "timeout_s": 240}


@dataclass
class Attack:
    fleet: Fleet
    canaries: dict[str, str]
    host_canary: Path
    marker: str
    probes: dict[str, dict[str, Any]]
    record: Any


def canary() -> str:
    return "fleet" + "canary-" + uuid.uuid4().hex


def plant_and_attack(fleet: Fleet, home: Path, host_canary: Path) -> Attack:
    canaries = {"claude-json": canary(), "other-token": canary(), "worker-env": canary(),
                "other-payload": canary(), "host-file": canary()}
    home.mkdir(parents=True, exist_ok=True)
    (home / ".claude.json").write_text(json.dumps({"oauthAccount": {"token": canaries["claude-json"]}}))
    host_canary.write_text(canaries["host-file"])
    tokens = TokenStore(fleet.settings)
    tokens.set("hostile", "forge", b"the-hostile-agents-own-token")
    tokens.set("other", "forge", canaries["other-token"].encode())
    fleet.start_worker(env={"HOME": str(home), "FLEET_TEST_SECRET": canaries["worker-env"],
                            "GITHUB_TOKEN": canaries["worker-env"]})
    client = fleet.client()
    neighbour = client.submit("other", {"note": canaries["other-payload"], "sleep": 600})
    wait_for_state(client, neighbour, State.RUNNING)
    url = urlsplit(fleet.settings.redis_url)
    marker = "fleetleftover-" + uuid.uuid4().hex[:8]
    task_id = client.submit("hostile", {
        "code": PROBES_SOURCE, "redis": [url.hostname, url.port], "own_tokens": ["forge"],
        "marker": marker, "host_canary": str(host_canary)})
    record = client.wait(task_id, 300)
    client.cancel(neighbour)
    assert record.state == State.SUCCEEDED, fleet.cli("logs", task_id).stdout[-2000:]
    assert record.result is not None
    return Attack(fleet, canaries, host_canary, marker, record.result["probes"], record)


@pytest.fixture(scope="module")
def attack(redis_server: RedisServer, docker_client: docker.DockerClient,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    directory = tmp_path_factory.mktemp("security")
    fleet = build_fleet(redis_server.url, directory, {"hostile": HOSTILE, "other": {"tokens": ["forge"]}})
    yield plant_and_attack(fleet, directory / "home", directory / "host-canary.txt")
    fleet.tear_down(docker_client)


def test_there_are_at_least_25_probes() -> None:
    assert len(PROBE_NAMES) >= 25
    assert len(set(PROBE_NAMES)) == len(PROBE_NAMES)


@pytest.mark.parametrize("probe", PROBE_NAMES)
def test_probe_is_blocked(attack: Attack, probe: str) -> None:
    result = attack.probes[probe]
    assert result["blocked"], f"{probe}: {result['detail']}"


def test_no_canary_reaches_the_logs_the_result_or_the_state_volume(
        attack: Attack, docker_client: docker.DockerClient) -> None:
    logs = attack.fleet.cli("logs", attack.record.id).stdout
    container = docker_client.containers.get(container_name(attack.fleet.settings, "hostile"))
    state = container.exec_run(["sh", "-c", "cat /state/* 2>/dev/null; ls -la /state"]).output.decode()
    for name, value in attack.canaries.items():
        assert value not in logs, name
        assert value not in json.dumps(attack.record.result), name
        assert value not in state, name


def test_no_process_outlives_the_task(attack: Attack, docker_client: docker.DockerClient) -> None:
    container = docker_client.containers.get(container_name(attack.fleet.settings, "hostile"))
    out = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).output.decode()
    assert attack.marker not in out


def test_the_container_recovers_from_the_bombs(attack: Attack) -> None:
    client = attack.fleet.client()
    after = client.wait(client.submit("hostile", {"code": "print('{\"ok\": 1}')"}), 120)
    assert after.state == State.SUCCEEDED and after.result == {"ok": 1}


def test_fleet_never_follows_links_planted_in_state(attack: Attack,
                                                    docker_client: docker.DockerClient) -> None:
    # The agent planted /state links to host paths. Cycle everything fleet
    # does with a container and its volume on the host, then check the host
    # file the link names is untouched and was never replaced.
    fleet = attack.fleet
    before = attack.host_canary.stat()
    for worker in fleet.workers:
        worker.stop()
    container = docker_client.containers.get(container_name(fleet.settings, "hostile"))
    container.stop(timeout=1)  # a dead container: the next worker removes and recreates it
    fleet.start_worker()
    assert fleet.cli("audit").returncode in (0, 1)
    client = fleet.client()
    assert client.wait(client.submit("hostile", {"code": "print('{}')"}), 120).state == State.SUCCEEDED
    after = attack.host_canary.stat()
    assert attack.host_canary.read_text() == attack.canaries["host-file"]
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns,
                                                                 before.st_size)


WEAKENINGS = {
    # probe that must catch it → how the container is weakened
    "filesystem-canary-scan": lambda kw, home: kw["mounts"].append(
        Mount(target="/mnt/host-home", source=str(home), type="bind", read_only=True)),
    "docker-socket": lambda kw, home: kw["mounts"].append(
        Mount(target="/var/run/docker.sock", source="/var/run/docker.sock", type="bind")),
    "capabilities": lambda kw, home: kw.update(cap_drop=[]),
}


@pytest.mark.parametrize("probe", sorted(WEAKENINGS))
def test_weakening_a_control_makes_its_probe_fail(
        probe: str, redis_server: RedisServer, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    fleet = build_fleet(redis_server.url, tmp_path, {"hostile": HOSTILE, "other": {"tokens": ["forge"]}})
    try:
        home = tmp_path / "home"
        home.mkdir()
        spec = build_spec(fleet.settings, "hostile", uid=TokenStore(fleet.settings).prepare("hostile"))
        docker_client.volumes.create(spec.volume, labels=spec.labels)
        kwargs = spec.create_kwargs()
        WEAKENINGS[probe](kwargs, home)
        # Labelled with the configured spec's hash, so the worker takes it as its own.
        docker_client.containers.create(**kwargs).start()
        attack = plant_and_attack(fleet, home, tmp_path / "host-canary.txt")
        assert not attack.probes[probe]["blocked"], attack.probes[probe]
    finally:
        fleet.tear_down(docker_client)
