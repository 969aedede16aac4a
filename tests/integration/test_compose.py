"""compose.dev.yml, as `docker-compose config` resolves it: only the socket
proxy touches the Docker socket, the proxy grants only what fleet calls, the
worker reaches the engine through it, and the secrets directory is mounted at
the path the engine will resolve."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.dev.yml"
SOCKET = "/var/run/docker.sock"
DEFAULT_SECRETS = "/var/lib/fleet/secrets"

# Proxy sections fleet's calls need (docker-py asks /version before anything).
GRANTED = ("POST", "CONTAINERS", "ALLOW_START", "ALLOW_EXEC", "EXEC", "VOLUMES", "IMAGES",
           "NETWORKS", "VERSION", "PING")
# Sections that hand out more than fleet uses: swarm, credentials, builds, host-wide state.
DENIED = ("AUTH", "BUILD", "COMMIT", "CONFIGS", "DISTRIBUTION", "EVENTS", "GRPC", "NODES",
          "PLUGINS", "SECRETS", "SERVICES", "SESSION", "SWARM", "SYSTEM", "TASKS",
          "ALLOW_ATTACH", "ALLOW_ARCHIVE", "ALLOW_EXPORT", "ALLOW_KILL", "ALLOW_LOGS",
          "ALLOW_RESTARTS")


def compose_config(**env: str) -> dict[str, Any]:
    """`docker-compose -f compose.dev.yml config`, parsed; `env` feeds its ${VARS}."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing (scripts/bootstrap.sh installs it)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "COMPOSE_"))}
    done = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each mount, from the short syntax config prints."""
    found = []
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        found.append((parts[0], parts[1], "ro" in mode.split(",")))
    return found


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


def test_only_the_proxy_mounts_the_socket_read_only(config: dict[str, Any]) -> None:
    holders = {name: [m for m in mounts(service) if SOCKET in (m[0], m[1])]
               for name, service in config["services"].items()}
    assert {name for name, found in holders.items() if found} == {"docker-proxy"}
    assert holders["docker-proxy"] == [(SOCKET, SOCKET, True)]


def test_the_proxy_is_reachable_only_by_the_worker(config: dict[str, Any]) -> None:
    services = config["services"]
    proxy = services["docker-proxy"]
    assert not proxy.get("ports"), "the proxy's port must never be published"
    proxy_networks = set(proxy["networks"])
    assert all(config["networks"][n].get("internal") for n in proxy_networks)
    neighbours = {name for name, s in services.items() if proxy_networks & set(s.get("networks", {}))}
    assert neighbours == {"docker-proxy", "worker"}


def test_the_worker_uses_the_engine_through_the_proxy(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    env = worker["environment"]
    assert env["DOCKER_HOST"] == "tcp://docker-proxy:2375"
    assert env["FLEET_REDIS_URL"].startswith("redis://:") and "@redis:6379/" in env["FLEET_REDIS_URL"]
    assert env["FLEET_HOST_ID"]
    assert worker["build"]["dockerfile"] == "containers/worker/Dockerfile"
    assert (ROOT / "containers/worker/Dockerfile").is_file()


def test_the_proxy_grants_what_fleet_calls_and_denies_the_rest(config: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in config["services"]["docker-proxy"]["environment"].items()}
    assert {k: env.get(k) for k in GRANTED} == dict.fromkeys(GRANTED, "1")
    assert {k: env.get(k) for k in DENIED} == dict.fromkeys(DENIED, "0")


def test_redis_keeps_an_append_only_file_on_a_volume(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert "appendonly yes" in " ".join(redis["command"])
    data = [source for source, target, _ in mounts(redis) if target == "/data"]
    assert data and data[0] in config["volumes"], "/data must be a named volume"


@pytest.mark.parametrize("secrets_dir", [None, "/srv/fleet-secrets"])
def test_the_secrets_dir_has_the_same_path_on_both_sides(secrets_dir: str | None) -> None:
    """The engine resolves a bind's source on the host, so the path the worker
    gives it must be the host's own."""
    config = compose_config(**({"FLEET_SECRETS_DIR": secrets_dir} if secrets_dir else {}))
    worker = config["services"]["worker"]
    expected = secrets_dir or DEFAULT_SECRETS
    assert worker["environment"]["FLEET_SECRETS_DIR"] == expected
    assert (expected, expected, False) in mounts(worker)


def test_the_mounted_fleet_config_loads(config: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    worker = config["services"]["worker"]
    env = worker["environment"]
    sources = {target: source for source, target, _ in mounts(worker)}
    source = Path(sources[env["FLEET_CONFIG"]])
    assert source.is_file()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLEET_CONFIG", str(source))
    settings = load_settings()
    assert settings.agents, "the sample config declares no agent"
    assert str(settings.secrets_dir) == env["FLEET_SECRETS_DIR"]
    assert settings.host == env["FLEET_HOST_ID"]


def test_redis_asks_for_a_password_the_worker_has_and_no_argv_shows(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    script = " ".join(redis["command"])
    assert "requirepass %s" in script and "exec redis-server /tmp/redis.conf" in script
    password = redis["environment"]["REDIS_PASSWORD"]
    assert password and password not in script  # the value reaches redis-server in a file, not its argv
    assert config["services"]["worker"]["environment"]["FLEET_REDIS_URL"].startswith(f"redis://:{password}@redis:")
