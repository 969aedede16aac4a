"""`fleet audit` passes on what fleet made and fails, with the right line, on
containers and images made deliberately weak."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable
from typing import Any

import docker
import pytest
from docker.types import Mount
from support import RUN_PREFIX, Fleet, MakeFleet

from fleet.container.spec import build_spec, container_name
from fleet.credentials.identity import AgentIdentities
from fleet.record import State


def audit(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet.cli("audit", *args, timeout=300)


def test_fleet_made_containers_pass(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"tokens": ["forge"]}, "boss": {}})
    fleet.cli("tokens", "set", "dev", "forge", input="a-token-value")
    fleet.start_worker()
    client = fleet.client()
    for agent in ("dev", "boss"):
        assert client.wait(client.submit(agent, {}), 60).state == State.SUCCEEDED
    done = audit(fleet, "--json")
    assert done.returncode == 0, done.stdout
    findings = [json.loads(line) for line in done.stdout.splitlines()]
    per_container = [f for f in findings if f["subject"] == container_name(fleet.settings, "dev")]
    assert len(per_container) >= 25
    assert all(f["ok"] for f in findings)
    assert {f["check"] for f in findings} >= {"token-dir-private", "no-docker-socket", "not-privileged"}
    assert any(f["cis"] == "5.31" for f in per_container)


def test_an_egress_agent_its_network_and_the_proxy_pass(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"egress": ["forge.test"]}})
    fleet.start_worker()
    client = fleet.client()
    assert client.wait(client.submit("dev", {}), 60).state == State.SUCCEEDED
    done = audit(fleet, "--json")
    assert done.returncode == 0, done.stdout
    findings = [json.loads(line) for line in done.stdout.splitlines()]
    proxy = [f for f in findings if f["subject"] == f"{fleet.settings.namespace}-proxy.testhost"]
    assert {f["check"] for f in proxy} >= {"not-privileged", "read-only-rootfs", "capabilities-dropped",
                                           "non-root-user", "no-docker-socket"}
    network = next(f for f in findings if f["check"] == "egress-network")
    assert "internal, no host address, shared with the proxy only (2 attached)" in network["detail"]


def test_an_agent_on_a_network_of_its_own_choosing_is_flagged_unrestricted(make_fleet: MakeFleet) -> None:
    done = audit(make_fleet({"dev": {"network": "somenet"}}))
    assert done.returncode == 1
    assert "FAIL  dev  network-restricted: unrestricted: on network 'somenet'" in done.stdout


Weaken = Callable[[dict[str, Any]], None]
WEAK_CONTAINERS: dict[str, tuple[Weaken, str]] = {
    "privileged": (lambda kw: kw.update(privileged=True),
                   "not-privileged (CIS 5.4): Privileged=True"),
    "root": (lambda kw: kw.update(user="0:0"),
             "non-root-user (CIS 4.1): User='0:0'"),
    "writable-token-mount": (lambda kw: kw["mounts"].__setitem__(1, Mount(
        target="/run/fleet/tokens", source=kw["mounts"][1]["Source"], type="bind", read_only=False)),
        "token-mount-read-only (CIS 5.5):"),
    "docker-socket": (lambda kw: kw["mounts"].append(Mount(
        target="/var/run/docker.sock", source="/var/run/docker.sock", type="bind")),
        "no-docker-socket (CIS 5.31): socket mounts=['/var/run/docker.sock']"),
    "capabilities": (lambda kw: kw.update(cap_drop=[], cap_add=["NET_ADMIN"]),
                     "capabilities-dropped (CIS 5.3):"),
    "host-network": (lambda kw: kw.update(network_mode="host"),
                     "no-host-network (CIS 5.9): NetworkMode='host'"),
}


@pytest.mark.parametrize("weakness", sorted(WEAK_CONTAINERS))
def test_a_weak_container_fails_with_the_right_line(
        weakness: str, make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    spec = build_spec(fleet.settings, "dev", uid=AgentIdentities(fleet.settings).uid("dev"))
    kwargs = spec.create_kwargs()
    weaken, expected = WEAK_CONTAINERS[weakness]
    weaken(kwargs)
    docker_client.volumes.create(spec.volume, labels=spec.labels)
    docker_client.containers.create(**kwargs)
    done = audit(fleet)
    assert done.returncode == 1
    failing = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert any(expected in line and spec.name in line for line in failing), done.stdout


def test_a_world_readable_token_directory_fails(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"tokens": ["forge"]}})
    fleet.cli("tokens", "set", "dev", "forge", input="value")
    (fleet.settings.secrets_dir / "dev" / "forge").chmod(0o644)
    done = audit(fleet)
    assert done.returncode == 1
    assert "FAIL" in done.stdout and "token-dir-private (CIS 5.5): forge is 0o644" in done.stdout


def test_the_agent_image_passes_the_static_audit(make_fleet: MakeFleet) -> None:
    done = audit(make_fleet({"dev": {}}), "--image")
    assert done.returncode == 0, done.stdout
    for check in ("image-non-root-user", "image-no-secret-env", "image-base-pinned",
                  "image-no-secret-files", "image-no-setuid"):
        assert f"PASS  fleet-agent:latest  {check}" in done.stdout


# A private key's shape (random base64, no real key), and the header alone as a key parser holds it.
PEM_KEY = ("deploy key\\n-----BEGIN OPENSSH PRIVATE KEY-----\\n" + "QUJD" * 40
           + "\\n-----END OPENSSH PRIVATE KEY-----\\n")
PEM_PARSER = "\\177ELF-----BEGIN OPENSSH PRIVATE KEY-----\\000parse\\000"


def test_a_weak_image_fails_the_static_audit(make_fleet: MakeFleet,
                                             docker_client: docker.DockerClient) -> None:
    tag = f"{RUN_PREFIX}-weak:test"
    dockerfile = (
        "FROM fleet-agent:latest\nUSER 0\nENV GITHUB_TOKEN=ghp_0123456789abcdefghijABCDEFGHIJ0123\n"
        "RUN echo '{\"token\": \"x\"}' > /root/.claude.json && chmod u+s /bin/ls\n"
        f"RUN printf '{PEM_KEY}' > /opt/deploy-key && printf '{PEM_PARSER}' > /usr/lib/libparser.so\n")
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    try:
        done = audit(make_fleet({"dev": {}}), f"--image={tag}")
        assert done.returncode == 1
        for check in ("image-non-root-user", "image-no-secret-env", "image-no-secret-files",
                      "image-no-setuid"):
            assert f"FAIL  {tag}  {check}" in done.stdout, done.stdout
        assert "/root/.claude.json" in done.stdout
        assert "/opt/deploy-key" in done.stdout  # found by what it holds, not by its name
        assert "/usr/lib/libparser.so" not in done.stdout  # a program that reads keys holds the header alone
    finally:
        docker_client.images.remove(tag, force=True)
