"""The host's egress proxy and the agents' networks, applied to the engine.

Each agent with `egress` gets an internal Docker network of its own: no
route out, and no address of the host's on its bridge (so neither the host
nor anything behind it answers), shared only with the proxy. The proxy
container (one per host, mitmproxy with fleet's addon) sits on every such
network and on `egress_network`, through which it reaches upstreams. It is
as hardened as an agent's container; the engine restarts it if it dies.
With it gone, an agent has no network at all: egress fails closed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import Mount, Ulimit

from fleet.container.engine import engine_errors
from fleet.container.spec import LABEL_HOST, LABEL_NAMESPACE, LABEL_SPEC_HASH
from fleet.credentials.identity import enforced, host_lock, proxy_id
from fleet.credentials.tokens import TokenStore
from fleet.egress.layout import INSIDE, LABEL_ROLE, ROLE_NETWORK, ROLE_PROXY, EgressLayout
from fleet.errors import EngineError
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

LABEL_AGENT = "fleet.agent"
PROXY_MEMORY = 512 * 1024**2
PROXY_READY_S = 60.0
READY_LINE = "fleet-egress: ready"  # printed by the addon (fleet/inside/proxy_image/fleet_egress.py)
PROXY_PIDS = 256
PROXY_NOFILE = 16384
# No address of the host's on the bridge: nothing of the host answers an agent.
INTERNAL_OPTIONS = {"com.docker.network.bridge.inhibit_ipv4": "true",
                    "com.docker.network.bridge.enable_ip_masquerade": "false"}


def proxy_create_kwargs(settings: FleetSettings) -> dict[str, Any]:
    """The proxy container, as docker-py's `containers.create` arguments (pure)."""
    layout = EgressLayout(settings)
    mounts = [
        Mount(target=str(INSIDE / "ca"), source=str(layout.ca_dir.resolve()), type="bind", read_only=True),
        Mount(target=str(INSIDE / "policies"), source=str(layout.policy_dir.resolve()), type="bind",
              read_only=True),
        Mount(target=str(INSIDE / "decisions"), source=str(layout.decisions_root.resolve()), type="bind",
              read_only=True),
        Mount(target=str(INSIDE / "injected"), source=str(layout.injected_dir.resolve()), type="bind",
              read_only=True),
    ]
    if settings.egress_ca_file is not None:
        mounts.append(Mount(target=str(INSIDE / "upstream-ca.pem"),
                            source=str(settings.egress_ca_file.resolve()), type="bind", read_only=True))
    labels = {LABEL_NAMESPACE: settings.namespace, LABEL_HOST: settings.host, LABEL_ROLE: ROLE_PROXY}
    kwargs: dict[str, Any] = {
        "image": settings.egress_image,
        "name": layout.proxy_name,
        "user": layout.proxy_user,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "init": True,
        "mem_limit": PROXY_MEMORY,
        "memswap_limit": PROXY_MEMORY,
        "pids_limit": PROXY_PIDS,
        "ulimits": [Ulimit(name="nofile", soft=PROXY_NOFILE, hard=PROXY_NOFILE),
                    Ulimit(name="core", soft=0, hard=0)],
        "ipc_mode": "private",
        "tmpfs": {"/tmp": "rw,nosuid,nodev,noexec,size=64m,mode=1777"},
        "network": settings.egress_network,
        "extra_hosts": dict(settings.egress_hosts),  # names it resolves statically
        "restart_policy": {"Name": "unless-stopped"},
        "mounts": mounts,
        "detach": True,
    }
    digest = hashlib.sha256(json.dumps({k: v for k, v in kwargs.items() if k != "mounts"}, sort_keys=True,
                                       default=str).encode())
    digest.update(json.dumps([dict(m) for m in mounts], sort_keys=True).encode())
    kwargs["labels"] = {**labels, LABEL_SPEC_HASH: digest.hexdigest()[:16]}
    return kwargs


def address_on(container: Container, network: str) -> str | None:
    """The container's address on `network`, as last inspected; None if it is not on it."""
    found = container.attrs.get("NetworkSettings", {}).get("Networks", {}).get(network, {}).get("IPAddress")
    return str(found) if found else None


class EgressProxy:
    """Makes and keeps the proxy, the agents' networks and their policies."""

    def __init__(self, client: docker.DockerClient, settings: FleetSettings) -> None:
        self.client = client
        self.settings = settings
        self.layout = EgressLayout(settings)

    def prepare(self, agent: str) -> str:
        """Everything `agent`'s container needs before it is made: its
        network, the CA, the proxy on that network, the agent's policy.
        Returns the proxy's address on the agent's network."""
        with self.locked(), engine_errors("setting up the egress proxy"):
            self.make_directories(agent)
            self.make_ca()
            network = self.network(agent)
            proxy = self.proxy()
            address = self.join(proxy, network)
            self.write_policy(agent, network)
        return address

    def address(self, agent: str) -> str | None:
        """The proxy's address on the agent's network, as the engine has it now."""
        with engine_errors("inspecting the egress proxy"):
            try:
                proxy = self.client.containers.get(self.layout.proxy_name)
            except docker.errors.NotFound:
                return None
        return address_on(proxy, self.layout.network_name(agent)) if proxy.status == "running" else None

    # -- the pieces ------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One consumer at a time sets up egress on this host (the engine
        would let two make networks of the same name)."""
        self.layout.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        with host_lock(self.layout.root / ".lock"):
            yield

    def make_directories(self, agent: str) -> None:
        gid = proxy_id(self.settings)
        TokenStore(self.settings).prepare_injected(agent)
        for path, mode in ((self.layout.policy_dir, 0o755), (self.layout.decisions_root, 0o750),
                           (self.layout.decisions_dir(agent), 0o750)):
            path.mkdir(parents=True, exist_ok=True, mode=mode)
            if enforced():
                os.chown(path, 0, gid)
            path.chmod(mode)

    def make_ca(self) -> None:
        """The host's CA, made once by mitmproxy itself (in a one-off run of
        the proxy image, as the proxy's user); agents get its certificate."""
        key = self.layout.ca_dir / "mitmproxy-ca.pem"
        if not key.is_file():
            self.layout.ca_dir.mkdir(mode=0o700, exist_ok=True)
            uid = proxy_id(self.settings)
            if enforced():
                os.chown(self.layout.ca_dir, uid, uid)
            log.info("making the egress proxy's CA in %s", self.layout.ca_dir)
            self.client.containers.run(
                self.settings.egress_image, ["-c", "from mitmproxy.certs import CertStore; "
                                             "CertStore.from_store('/ca', 'mitmproxy', 2048)"],
                entrypoint=["/opt/mitmproxy/bin/python3"], remove=True, user=self.layout.proxy_user,
                network_mode="none", cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
                read_only=True,
                mounts=[Mount(target="/ca", source=str(self.layout.ca_dir.resolve()), type="bind")],
                labels={LABEL_NAMESPACE: self.settings.namespace})
        certificate = self.layout.ca_dir / "mitmproxy-ca-cert.pem"
        if not self.layout.ca_cert.is_file() or self.layout.ca_cert.read_bytes() != certificate.read_bytes():
            temp = self.layout.ca_cert.with_suffix(".tmp")
            shutil.copyfile(certificate, temp)
            temp.chmod(0o644)
            temp.rename(self.layout.ca_cert)

    def network(self, agent: str) -> Network:
        name = self.layout.network_name(agent)
        try:
            return self.client.networks.get(name)
        except docker.errors.NotFound:
            pass
        log.info("creating network %s (internal: only the egress proxy answers)", name)
        return self.client.networks.create(
            name, driver="bridge", internal=True, options=INTERNAL_OPTIONS, check_duplicate=True,
            labels={LABEL_NAMESPACE: self.settings.namespace, LABEL_HOST: self.settings.host,
                    LABEL_ROLE: ROLE_NETWORK, LABEL_AGENT: agent})

    def proxy(self) -> Container:
        """The proxy container, running and as configured (else made anew,
        and joined to every agent network of this host)."""
        wanted = proxy_create_kwargs(self.settings)
        try:
            proxy = self.client.containers.get(self.layout.proxy_name)
        except docker.errors.NotFound:
            proxy = None
        image = self.image_id()
        if proxy is not None and (proxy.labels.get(LABEL_SPEC_HASH) != wanted["labels"][LABEL_SPEC_HASH]
                                  or proxy.attrs.get("Image") != image):
            log.info("replacing the egress proxy %s (its spec or image changed)", proxy.name)
            proxy.remove(force=True)
            proxy = None
        if proxy is None:
            log.info("creating the egress proxy %s", self.layout.proxy_name)
            proxy = self.client.containers.create(**wanted)
            for network in self.agent_networks():
                network.connect(proxy)
        if proxy.status != "running":
            since = int(time.time())
            proxy.start()
            self.wait_until_ready(proxy, since)
        proxy.reload()
        return proxy

    def wait_until_ready(self, proxy: Container, since: int) -> None:
        """Until the proxy says it listens (its addon prints READY_LINE once
        mitmproxy runs), or EngineError with what it said instead."""
        ready = threading.Event()

        def watch() -> None:
            with suppress(docker.errors.APIError):
                for line in proxy.logs(stream=True, follow=True, since=since):
                    if READY_LINE.encode() in line:
                        ready.set()
                        return

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(PROXY_READY_S):
            tail = proxy.logs(tail=5).decode(errors="replace").strip().splitlines()
            raise EngineError(f"the egress proxy {proxy.name} did not start within {PROXY_READY_S:.0f} s: "
                              f"{tail[-1] if tail else 'it said nothing'}")

    def join(self, proxy: Container, network: Network) -> str:
        """The proxy on `network`; returns its address there."""
        address = address_on(proxy, str(network.name))
        if address is None:
            with suppress(docker.errors.APIError):  # already joined by a concurrent start
                network.connect(proxy)
            proxy.reload()
            address = address_on(proxy, str(network.name))
        if address is None:
            raise EngineError(f"the egress proxy has no address on network {network.name}")
        return str(address)

    def write_policy(self, agent: str, network: Network) -> None:
        """The agent's policy file, which the proxy reads on its next request."""
        network.reload()
        subnets = [c["Subnet"] for c in network.attrs.get("IPAM", {}).get("Config") or [] if c.get("Subnet")]
        spec = self.settings.agent(agent)
        tokens = TokenStore(self.settings)
        policy = {
            "agent": agent,
            "networks": subnets,
            "allow": spec.egress,
            "inject": [{"host": rule.host, "header": rule.header, "value": rule.value,
                        "token_file": self.layout.inside(tokens.injected_directory(agent) / name)}
                       for name, rule in spec.inject.items()],
            "decisions": self.layout.inside(self.layout.decisions_dir(agent)),
        }
        path = self.layout.policy_dir / f"{agent}.json"
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(policy, indent=1))
        temp.chmod(0o644)
        temp.rename(path)

    def image_id(self) -> str:
        try:
            return str(self.client.images.get(self.settings.egress_image).id)
        except docker.errors.ImageNotFound:
            raise EngineError(
                f"image {self.settings.egress_image} is missing: run `fleet image build`") from None

    def agent_networks(self) -> list[Network]:
        return list(self.client.networks.list(filters={"label": [
            f"{LABEL_NAMESPACE}={self.settings.namespace}", f"{LABEL_HOST}={self.settings.host}",
            f"{LABEL_ROLE}={ROLE_NETWORK}"]}))

    def remove(self) -> None:
        """The proxy and this host's agent networks (the demo and tests clean up with it)."""
        with suppress(docker.errors.NotFound):
            self.client.containers.get(self.layout.proxy_name).remove(force=True)
        for network in self.agent_networks():
            with suppress(docker.errors.APIError):
                network.remove()

    def remove_orphans(self) -> list[str]:
        """The networks (and policies) of agents that no longer have egress on
        this host, and the proxy once none has: what `fleet worker` clears at
        start, after the orphaned containers. A network something else is
        still attached to is left alone."""
        wanted = {self.layout.network_name(agent) for agent, spec in self.settings.agents.items()
                  if spec.egress and spec.serves(self.settings.host)}
        removed = []
        with engine_errors("removing unused egress networks"):
            for network in self.agent_networks():
                if network.name in wanted:
                    continue
                network.reload()
                for attached in network.containers:
                    if attached.name == self.layout.proxy_name:
                        network.disconnect(attached, force=True)
                with suppress(docker.errors.APIError):  # another container is on it still
                    network.remove()
                    removed.append(str(network.name))
                    agent = (network.attrs.get("Labels") or {}).get(LABEL_AGENT, "")
                    (self.layout.policy_dir / f"{agent}.json").unlink(missing_ok=True)
            if not wanted:
                with suppress(docker.errors.NotFound):
                    self.client.containers.get(self.layout.proxy_name).remove(force=True)
                    removed.append(self.layout.proxy_name)
        return removed
