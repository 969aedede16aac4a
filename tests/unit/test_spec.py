"""The hardened container spec is pure data: built and hashed without Docker."""

from __future__ import annotations

from pathlib import Path

from docker.types import Mount

from fleet.broker.routing import queue_name
from fleet.container.spec import LABEL_SPEC_HASH, build_spec, resource_name
from fleet.settings import AgentSpec, FleetSettings


def settings(**agent: object) -> FleetSettings:
    return FleetSettings(namespace="fleet", host_id="host-a", secrets_dir=Path("/srv/secrets"),
                         agents={"dev": AgentSpec(**agent), "boss": AgentSpec()})


def test_routing_is_a_pure_function_of_the_agent() -> None:
    assert queue_name("fleet", "dev") == "fleet.agent.dev"
    assert queue_name("t1", "reviewer") == "t1.agent.reviewer"


def test_names_carry_namespace_agent_and_host() -> None:
    spec = build_spec(settings(), "dev", uid=10001)
    assert spec.name == "fleet-dev-host-a"
    assert spec.volume == "fleet-dev-host-a-state"
    assert resource_name("fleet", "dev", "a b/c") == "fleet-dev-a_b_c"


def test_hardening() -> None:
    kwargs = build_spec(settings(memory="512m", cpus=0.5, pids_limit=64), "dev", uid=10001).create_kwargs()
    assert kwargs["user"] == "10001:10001"
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]
    assert "cap_add" not in kwargs
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["privileged"] is False
    assert kwargs["init"] is True
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == 512 * 1024**2
    assert kwargs["nano_cpus"] == 500_000_000
    assert kwargs["pids_limit"] == 64
    assert kwargs["network_mode"] == "none"
    assert kwargs["environment"] == {"HOME": "/home/agent"}
    assert set(kwargs["tmpfs"]) == {"/home/agent", "/tmp"}
    mounts: list[Mount] = kwargs["mounts"]
    assert [(m["Target"], m["Type"], m["ReadOnly"]) for m in mounts] == [
        ("/state", "volume", False), ("/run/fleet/tokens", "bind", True)]
    assert mounts[1]["Source"] == "/srv/secrets/dev"
    assert not any("docker.sock" in str(m) for m in mounts)


def test_hash_changes_with_the_spec_and_only_then() -> None:
    base = build_spec(settings(), "dev", uid=10001)
    assert build_spec(settings(), "dev", uid=10001).hash == base.hash
    assert build_spec(settings(memory="2g"), "dev", uid=10001).hash != base.hash
    assert build_spec(settings(image="other:1"), "dev", uid=10001).hash != base.hash
    assert build_spec(settings(timeout_s=5), "dev", uid=10001).hash == base.hash  # not a container property
    assert base.create_kwargs()["labels"][LABEL_SPEC_HASH] == base.hash
