"""The world a real agent CLI works in, stood in for: a model API (the
Messages API, scripted: fleet/inside/standin/model_api.py) and a forge
(git's smart HTTP: fleet/inside/standin/forge.py), each in a container on
one internal network that only fleet's egress proxy joins, answering over
HTTPS as the real names, with a certificate from a CA of their own (the
proxy's `egress_ca_file`). Each knows the SHA-256 of the credential it
accepts, never the credential; the agent's proxy adds the real one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import Mount

from fleet.container.image import INSIDE
from fleet.standin.upstream import (
    auth_sha256,
    certificate_mount,
    fresh_network,
    issue_certificate,
    remove_standins,
    start_server,
)

MODEL_HOST = "api.anthropic.com"  # Claude Code's own default: nothing in it is pointed elsewhere
FORGE_HOST = "forge.example.com"
REPOSITORY = "team/app"
SCRIPTS = INSIDE / "standin"
REPOSITORY_URL = f"https://{FORGE_HOST}/{REPOSITORY}.git"
BARE_ROOT = "/srv/git"


@dataclass
class RealAgentWorld:
    network: str  # the proxy's egress_network: the only way to either
    ca_file: Path  # the proxy's egress_ca_file
    addresses: dict[str, str]  # host → address: the proxy's egress_hosts
    model: Container
    forge: Container
    net: Network

    def remove(self) -> None:
        remove_standins([self.model, self.forge], self.net)

    def git(self, *arguments: str) -> tuple[int, str]:
        """git on the forge's bare repository: (exit code, output)."""
        done = self.forge.exec_run(["git", "--git-dir", f"{BARE_ROOT}/{REPOSITORY}.git", *arguments])
        output = done.output if isinstance(done.output, bytes) else b""
        return int(done.exit_code or 0), output.decode(errors="replace").strip()

    def branch_head(self, branch: str) -> str | None:
        code, output = self.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}")
        return output if code == 0 else None

    @staticmethod
    def notes(container: Container) -> list[dict[str, Any]]:
        """What a stand-in noted, a JSON object a line."""
        found = []
        for line in container.logs(stdout=True, stderr=False).decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found


def start_real_agent_world(client: docker.DockerClient, name: str, *, image: str, proxy_image: str,
                           namespace: str, directory: Path, model_key: str,
                           forge_authorization: str) -> RealAgentWorld:
    """Both stand-ins, on the internal network `name`. `model_key` is the
    x-api-key value the model API accepts; `forge_authorization` the
    Authorization value the forge does. `image` needs python3 and git."""
    ca_file = issue_certificate(client, proxy_image, directory, (MODEL_HOST, FORGE_HOST))
    scripts = Mount(target="/standin", source=str(SCRIPTS), type="bind", read_only=True)
    mounts = [certificate_mount(ca_file.parent), scripts]
    net = fresh_network(client, name, namespace)
    started: list[Container] = []
    try:
        model, model_address = start_server(
            client, net, f"{name}-model", (MODEL_HOST,), image=image, namespace=namespace, mounts=mounts,
            command=["python3", "/standin/model_api.py"],
            environment={"ACCEPT_SHA256": auth_sha256(model_key), "PYTHONDONTWRITEBYTECODE": "1"})
        started.append(model)
        forge, forge_address = start_server(
            client, net, f"{name}-forge", (FORGE_HOST,), image=image, namespace=namespace, mounts=mounts,
            command=["python3", "/standin/forge.py", REPOSITORY], tmpfs={BARE_ROOT: "rw,size=64m"},
            environment={"ACCEPT_SHA256": auth_sha256(forge_authorization), "PYTHONDONTWRITEBYTECODE": "1"})
        started.append(forge)
    except BaseException:
        remove_standins(started, net)
        raise
    return RealAgentWorld(name, ca_file, {MODEL_HOST: model_address, FORGE_HOST: forge_address},
                          model, forge, net)


def push_task(branch: str) -> dict[str, str]:
    """The payload of the job the stand-in model drives: clone the forge's
    repository, add NOTES.md, commit, push `branch`."""
    return {"task": f"Clone {REPOSITORY_URL}, add the file NOTES.md, commit it and push it to "
                    f"branch {branch}."}


def egress_settings(world: RealAgentWorld) -> dict[str, Any]:
    """The top-level settings that send an agent's egress to `world`: the
    proxy's network, the stand-ins' CA and their names."""
    return {"egress_network": world.network, "egress_ca_file": str(world.ca_file.resolve()),
            "egress_hosts": dict(world.addresses)}


def claude_code_agent(image: str) -> dict[str, Any]:
    """An agent running Claude Code (the claude-code recipe's image), which
    reaches the model API and the forge through the proxy, both tokens
    injected there (its container holds placeholders)."""
    return {
        "image": image,
        "command": ["fleet-claude", "--model-token", "anthropic", "--git-token", f"{FORGE_HOST}=forge"],
        "tokens": ["anthropic", "forge"],
        "egress": [f"{MODEL_HOST}:443", f"{FORGE_HOST}:443"],
        "memory": "2g",
        "timeout_s": 300,
        "inject": {
            "anthropic": {"host": MODEL_HOST, "header": "x-api-key", "value": "{token}"},
            "forge": {"host": FORGE_HOST, "header": "Authorization", "value": "token {token}"},
        },
    }
