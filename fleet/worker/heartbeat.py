"""The host's heartbeat: its registration in Redis, renewed every
`heartbeat_s` from a child process of `fleet worker`."""

from __future__ import annotations

import logging
import os
import time

from fleet.connection import connect_redis
from fleet.container.engine import connect
from fleet.container.manager import ContainerManager
from fleet.container.spec import LABEL_SPEC_HASH
from fleet.errors import FleetError
from fleet.settings import FleetSettings
from fleet.state.hosts import HostRegistry, Registration
from fleet.state.keys import Keys
from fleet.worker.consumer import redis_timeouts

log = logging.getLogger("fleet.worker")


class Heartbeat:
    """Registers this host in Redis and renews it every `heartbeat_s`, with
    the containers fleet runs here. The first beat is the parent's own; the
    renewals run in a child process of their own, so that the parent has no
    thread when it forks a consumer (a lock a thread held at the fork would
    stay held in the child)."""

    def __init__(self, settings: FleetSettings, agents: list[str]) -> None:
        self.settings = settings
        self.registration = Registration(
            host_id=settings.host, agents=agents, pid=os.getpid(), started_at=time.time(),
            slots={agent: settings.agents[agent].concurrency for agent in agents})

    def registry(self) -> HostRegistry:
        return HostRegistry(connect_redis(self.settings, **redis_timeouts(self.settings)),
                            Keys(self.settings.namespace), self.settings.heartbeat_s)

    def beat(self, registry: HostRegistry, manager: ContainerManager) -> None:
        containers = {str(c.name): c.labels.get(LABEL_SPEC_HASH, "") for c in manager.containers()}
        specs = {agent: manager.spec(agent).hash for agent in self.registration.agents}
        self.registration = self.registration.model_copy(update={"containers": containers, "specs": specs})
        registry.beat(self.registration)

    def run(self) -> None:
        """Renew the registration until the process is told to stop; a
        failed beat is logged and tried again at the next."""
        registry, manager = self.registry(), ContainerManager(connect(), self.settings)
        while True:
            time.sleep(self.settings.heartbeat_s)
            try:
                self.beat(registry, manager)
            except FleetError as error:
                log.warning("heartbeat of host %s failed: %s", self.settings.host, error)

    def stopped(self) -> None:
        try:
            self.registry().stopped(self.registration)
        except FleetError as error:
            log.warning("could not record host %s as stopped: %s", self.settings.host, error)
