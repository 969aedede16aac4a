"""Applying container specs to the engine: one long-lived container per agent
per host, created on first need, reused for every task, and recreated only
between tasks when it is gone, stopped, or has drifted from its spec."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount

from fleet.container.engine import engine_errors, first_line
from fleet.container.spec import (
    LABEL_AGENT,
    LABEL_HOST,
    LABEL_NAMESPACE,
    LABEL_SPEC_HASH,
    LABEL_UID,
    STATE_DIR,
    ContainerSpec,
    build_spec,
)
from fleet.credentials.identity import AgentIdentities
from fleet.egress.layout import LABEL_ROLE, ROLE_PROXY, agent_environment
from fleet.egress.proxy import EgressProxy
from fleet.errors import EngineError
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

RECHECK_S = 5.0  # how long a verified container is trusted without asking the engine


class ContainerManager:
    def __init__(self, client: docker.DockerClient, settings: FleetSettings) -> None:
        self.client = client
        self.settings = settings
        self._changed = threading.Condition()
        self._in_use: Counter[str] = Counter()
        self._verified: dict[str, tuple[Container, float]] = {}
        self._specs: dict[str, ContainerSpec] = {}  # settings are frozen: an agent's spec never changes
        self._condemned: dict[str, str] = {}  # agent → the id of a container no longer trusted
        self.egress = EgressProxy(client, settings)
        self._proxy_address: dict[str, str] = {}  # agent → the egress proxy's address on its network

    @contextmanager
    def use(self, agent: str, connected: Callable[[Container], bool] | None = None) -> Iterator[Container]:
        """The agent's container, up and matching its spec, held for one task.

        A container that must be replaced is replaced only once no task of
        this process is using it; until then the caller waits. A container
        checked less than RECHECK_S ago, to which the forwarder still holds a
        live connection (`connected`), is taken without asking the engine."""
        spec = self.spec(agent)
        with self._changed:
            while True:
                cached, checked_at = self._verified.get(agent, (None, 0.0))
                if (cached is not None and connected is not None and connected(cached)
                        and time.monotonic() - checked_at < RECHECK_S):
                    container = cached
                    break
                found, reason = self.inspect(spec)
                if found is not None and found.id == self._condemned.get(agent):
                    reason = "no longer trusted"
                if reason is None and found is not None:
                    self.check_egress(agent)
                    container = found
                    self._verified[agent] = (container, time.monotonic())
                    break
                if self._in_use[agent] == 0:
                    made = self.recreate(spec, found, reason or "missing")
                    if made is not None:
                        container = made
                        self._verified[agent] = (made, time.monotonic())
                        break
                    continue  # another process made it meanwhile: look again
                self._changed.wait()
            self._in_use[agent] += 1
        try:
            yield container
        finally:
            with self._changed:
                self._in_use[agent] -= 1
                self._changed.notify_all()

    def check_egress(self, agent: str) -> None:
        """For an agent with egress: the proxy is up on its network (set up
        again if not), and its address there is known."""
        if not self.settings.agent(agent).egress:
            return
        address = self.egress.address(agent)
        self._proxy_address[agent] = address or self.egress.prepare(agent)

    def network_environment(self, agent: str, task_id: str, attempt: int) -> tuple[tuple[str, str], ...]:
        """The egress variables of a task of `agent` (none without egress)."""
        address = self._proxy_address.get(agent)
        return agent_environment(address, task_id, attempt) if address else ()

    def spec(self, agent: str) -> ContainerSpec:
        """The agent's spec on this host, with its own uid (allocated on first
        need). Settings are frozen and an uid is kept: made once per process."""
        if agent not in self._specs:
            uid = AgentIdentities(self.settings).uid(agent)
            self._specs[agent] = build_spec(self.settings, agent, uid=uid)
        return self._specs[agent]

    def condemn(self, agent: str, container: Container, why: str) -> bool:
        """No longer trust this container of `agent` (its supervisor was
        lost, or a task outlived its deadline): it is killed now, and
        replaced before the next task. True the first time for a container."""
        with self._changed:
            if self._condemned.get(agent) == container.id:
                return False
            self._condemned[agent] = str(container.id)
            self._verified.pop(agent, None)
        log.error("container %s is no longer trusted (%s): killing it", container.name, why)
        with engine_errors(f"killing container {container.name}"), suppress(docker.errors.NotFound):
            try:
                container.kill()
            except docker.errors.APIError as error:
                if error.status_code != 409:  # 409: it is not running any more
                    raise
        return True

    def invalidate(self, agent: str) -> None:
        """Look at the engine again before the next task of `agent`."""
        with self._changed:
            self._verified.pop(agent, None)

    def ensure(self, agent: str) -> Container:
        with self.use(agent) as container:
            return container

    def inspect(self, spec: ContainerSpec) -> tuple[Container | None, str | None]:
        """The existing container and why it must be replaced (None if it is fine)."""
        with engine_errors(f"inspecting container {spec.name}"):
            try:
                container = self.client.containers.get(spec.name)
            except docker.errors.NotFound:
                return None, "missing"
            if container.status == "created":  # another process made it and is starting it
                container.start()
                container.reload()
            if container.status != "running":
                return container, f"container is {container.status}"
            if container.labels.get(LABEL_SPEC_HASH) != spec.hash:
                return container, "spec changed"
            if container.attrs.get("Image") != self.image_id(spec.image):
                return container, "image changed"
        return container, None

    def image_id(self, tag: str) -> str:
        try:
            return str(self.client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            from fleet.container.recipes import build_command

            raise EngineError(f"image {tag} is missing: run `{build_command(tag)}`") from None

    def recreate(self, spec: ContainerSpec, old: Container | None, reason: str) -> Container | None:
        """Replace `old` (if any) with a container made from `spec`. None if
        another process (a second consumer of the agent on this host) got
        there first: the caller looks again."""
        log.info("creating container %s (%s)", spec.name, reason)
        with engine_errors(f"creating container {spec.name}"):
            if old is not None:
                with suppress(docker.errors.NotFound):
                    old.remove(force=True)
            self.ensure_volume(spec)
            if self.settings.agent(spec.labels[LABEL_AGENT]).egress:
                self._proxy_address[spec.labels[LABEL_AGENT]] = self.egress.prepare(spec.labels[LABEL_AGENT])
            else:
                self.check_network(spec.network)
            self.image_id(spec.image)
            try:
                container = self.client.containers.create(**spec.create_kwargs())
                container.start()
            except docker.errors.APIError as error:
                # 409: the name is taken (someone made it just now) or ours was
                # removed under us; 404: it is gone. Either way, look again.
                if error.status_code in (404, 409):
                    return None
                raise
            container.reload()
        return container

    def ensure_volume(self, spec: ContainerSpec) -> None:
        """The agent's state volume, the agent's. A new one is labelled with
        the agent's uid; one without that label (made before agents had uids
        of their own, when all were 10001's) has its files given to the uid."""
        owner = str(spec.uid)
        try:
            volume = self.client.volumes.get(spec.volume)
            if (volume.attrs.get("Labels") or {}).get(LABEL_UID) == owner:
                return
        except docker.errors.NotFound:
            # A new volume takes the image's /state (1777): any agent's uid writes its own files there.
            quota = {"size": spec.state_size} if spec.state_size else {}
            try:
                self.client.volumes.create(name=spec.volume, labels={**spec.labels, LABEL_UID: owner},
                                           driver_opts=quota)
            except docker.errors.APIError as error:
                if not quota:
                    raise
                raise EngineError(
                    f"state_size {spec.state_size} for {spec.volume}: the engine cannot enforce it "
                    f"({first_line(error)}); its volumes must be on XFS mounted with pquota") from None
            return
        self.give_volume(spec)

    def give_volume(self, spec: ContainerSpec) -> None:
        """chown the state volume to the agent's uid, in a one-off container
        that can do only that (root with CAP_CHOWN and CAP_FOWNER, no network)."""
        log.info("giving volume %s to uid %d", spec.volume, spec.uid)
        self.client.containers.run(
            spec.image, ["chown", "-R", f"{spec.uid}:{spec.uid}", STATE_DIR], remove=True, user="0:0",
            network_mode="none", cap_drop=["ALL"], cap_add=["CHOWN", "FOWNER", "DAC_READ_SEARCH"],
            security_opt=["no-new-privileges:true"], read_only=True,
            mounts=[Mount(target=STATE_DIR, source=spec.volume, type="volume")],
            labels={LABEL_NAMESPACE: self.settings.namespace})

    def check_network(self, network: str) -> None:
        if network == "none":
            return
        try:
            self.client.networks.get(network)
        except docker.errors.NotFound:
            raise EngineError(
                f"network {network!r} does not exist: docker network create {network}"
            ) from None

    def containers(self) -> list[Container]:
        """Every container fleet made on this host in this namespace."""
        filters: dict[str, str | list[str] | bool] = {"label": [
            f"{LABEL_NAMESPACE}={self.settings.namespace}",
                             f"{LABEL_HOST}={self.settings.host}"]}
        with engine_errors("listing containers"):
            # Another consumer may remove one while we list: skip it, do not fail.
            found: list[Container] = self.client.containers.list(all=True, filters=filters,
                                                                 ignore_removed=True)
        return found

    def remove_orphans(self) -> list[str]:
        """Remove this host's containers of agents no longer configured (or
        no longer allowed on this host) and dead ones. State volumes are
        kept: they hold the agents' data. The egress proxy is no agent's."""
        removed = []
        for container in self.containers():
            if container.labels.get(LABEL_ROLE) == ROLE_PROXY:
                continue
            agent = container.labels.get(LABEL_AGENT, "")
            # "created": another consumer of the agent is starting it right now.
            spec = self.settings.agents.get(agent)
            if spec is not None and spec.serves(self.settings.host) \
                    and container.status in ("running", "created"):
                continue
            with engine_errors(f"removing container {container.name}"), \
                    contextlib.suppress(docker.errors.NotFound):  # another consumer got there first
                container.remove(force=True)
            removed.append(str(container.name))
        return removed
