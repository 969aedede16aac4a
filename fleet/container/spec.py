"""The hardened container spec of one agent on one host, as pure data.

Building it talks to nothing, so it is tested without Docker, and its hash
(a label on the container) is how drift is noticed: a container whose label
differs from the configured spec's hash is recreated between tasks."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fleet.egress.layout import AGENT_CA, SYSTEM_BUNDLE, EgressLayout
from fleet.settings import FleetSettings

HOME = "/home/agent"
STATE_DIR = "/state"
TOKEN_DIR = "/run/fleet/tokens"
LABEL_PREFIX = "fleet."
LABEL_NAMESPACE = "fleet.namespace"
LABEL_AGENT = "fleet.agent"
LABEL_HOST = "fleet.host"
LABEL_SPEC_HASH = "fleet.spec-hash"
LABEL_UID = "fleet.uid"  # on a state volume: the uid it was given to
NOFILE_LIMIT = 4096
# The container's own command: `sleep`, installed execute-only (0111, root's)
# so that the process is not dumpable: a task cannot ptrace it into starting
# processes of its own (fleet/inside/agent_image/Dockerfile).
IDLE = "/usr/local/libexec/fleet-idle"


def resource_name(namespace: str, agent: str, host: str) -> str:
    """Docker names allow [a-zA-Z0-9_.-]; host ids are folded to that."""
    return f"{namespace}-{agent}-{re.sub(r'[^a-zA-Z0-9_.-]', '_', host)}"


class ContainerSpec(BaseModel):
    """Everything the engine is told when the container is created."""

    model_config = ConfigDict(frozen=True)

    name: str
    image: str
    volume: str
    state_size: str | None = None  # the engine's quota on the state volume
    token_dir: str
    egress_ca: str | None = None  # fleet's CA certificate, for an agent that reaches out through the proxy
    user: str
    network: str
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    labels: dict[str, str]

    def create_kwargs(self) -> dict[str, Any]:
        """Arguments for docker-py's `containers.create`."""
        from docker.types import Mount, Ulimit

        return {
            "image": self.image,
            "name": self.name,
            "command": [IDLE, "infinity"],
            "hostname": self.labels[LABEL_AGENT],
            "user": self.user,
            "working_dir": HOME,
            "environment": {"HOME": HOME},
            "labels": {**self.labels, LABEL_SPEC_HASH: self.hash},
            "init": True,  # docker-init (tini) as PID 1 reaps orphaned children
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "privileged": False,
            "mem_limit": self.memory_bytes,
            "memswap_limit": self.memory_bytes,  # no swap beyond the memory limit
            "nano_cpus": self.nano_cpus,
            "pids_limit": self.pids_limit,
            "ulimits": [Ulimit(name="nofile", soft=NOFILE_LIMIT, hard=NOFILE_LIMIT),
                        Ulimit(name="core", soft=0, hard=0)],  # no core dump holds a task's memory
            "ipc_mode": "private",
            "network_mode": self.network,
            "restart_policy": {"Name": "no"},  # fleet recreates a dead container itself
            "tmpfs": {
                HOME: f"rw,nosuid,nodev,size=64m,mode=0700,uid={self.uid},gid={self.uid}",
                "/tmp": "rw,nosuid,nodev,size=256m,mode=1777",
            },
            "mounts": [
                Mount(target=STATE_DIR, source=self.volume, type="volume"),
                Mount(target=TOKEN_DIR, source=self.token_dir, type="bind", read_only=True,
                      propagation="rprivate"),
                # The proxy re-signs every upstream with fleet's CA: the only one the agent needs to trust.
                *(Mount(target=target, source=self.egress_ca, type="bind", read_only=True)
                  for target in (AGENT_CA, SYSTEM_BUNDLE) if self.egress_ca),
            ],
            "detach": True,
        }

    @property
    def uid(self) -> int:
        return int(self.user.split(":")[0])

    @property
    def hash(self) -> str:
        """A digest of the spec; the labels other than identity don't count."""
        data = self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def token_dir(secrets_dir: Path, agent: str) -> Path:
    return secrets_dir / agent


def container_name(settings: FleetSettings, agent: str) -> str:
    """The name of the agent's container on this host."""
    return resource_name(settings.namespace, agent, settings.host)


def build_spec(settings: FleetSettings, agent: str, *, uid: int) -> ContainerSpec:
    """The agent's container on this host, run as `uid` (its own: identity.py)."""
    spec = settings.agent(agent)
    host = settings.host
    name = resource_name(settings.namespace, agent, host)
    egress = EgressLayout(settings)
    return ContainerSpec(
        name=name,
        image=spec.image,
        volume=f"{name}-state",
        state_size=spec.state_size,
        token_dir=str(token_dir(settings.secrets_dir.resolve(), agent)),
        egress_ca=str(egress.ca_cert.resolve()) if spec.egress else None,
        user=f"{uid}:{uid}",
        network=egress.network_name(agent) if spec.egress else spec.network,
        memory_bytes=spec.memory_bytes,
        nano_cpus=int(spec.cpus * 1e9),
        pids_limit=spec.pids_limit,
        labels={LABEL_NAMESPACE: settings.namespace, LABEL_AGENT: agent, LABEL_HOST: host},
    )
