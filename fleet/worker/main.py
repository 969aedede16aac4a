"""`fleet worker`: the consumers of this host. One child process per agent,
each a Celery worker bound to that agent's queues with `concurrency` thread
slots, each making sure of its agent's container; the parent checks the
images, removes orphans, registers the host (a child process renews the
heartbeat), forwards signals, restarts a child that dies, and exits when
told to stop. Children are forked from the parent, which has imported
everything they need."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from functools import partial
from types import FrameType

from fleet.container.engine import connect
from fleet.container.manager import ContainerManager
from fleet.errors import UsageError
from fleet.settings import FleetSettings
from fleet.worker.children import Children
from fleet.worker.health import serve_health
from fleet.worker.heartbeat import Heartbeat
from fleet.worker.on_done import deliver_forever, hook_secrets

log = logging.getLogger("fleet.worker")


def agents_served(settings: FleetSettings, asked: list[str]) -> list[str]:
    """The agents this host's worker runs: those asked for (each must be
    configured and allowed on this host), or every agent allowed here."""
    host = settings.host
    for agent in asked:
        settings.check_serves(agent, host)
    served = asked or [name for name, spec in settings.agents.items() if spec.serves(host)]
    if not served:
        raise UsageError(f"no configured agent may run on host {host!r}")
    return served


def run_workers(settings: FleetSettings, agents: list[str], health: tuple[str, int] | None = None) -> int:
    """Start one consumer process per agent and supervise them until stopped.
    Each consumer makes sure of its agent's container before it consumes, so
    the engine and the consumers' start-up work at once; what would fail
    them all (a missing image) is checked here first."""
    agents = agents_served(settings, agents)
    hook_secrets(settings)  # a hook's missing secret fails here, not in its deliverer
    manager = ContainerManager(connect(), settings)
    images = {settings.agents[agent].image for agent in agents}
    if any(settings.agents[agent].egress for agent in agents):
        images.add(settings.egress_image)  # the egress proxy's
    for image in sorted(images):
        manager.image_id(image)
    for name in manager.remove_orphans():
        log.info("removed orphaned container %s", name)
    for name in manager.egress.remove_orphans():
        log.info("removed %s: no agent of this host has its egress any more", name)
    heartbeat = Heartbeat(settings, agents)
    heartbeat.beat(heartbeat.registry(), manager)  # registered before any consumer runs
    others: dict[str, Callable[[], int | None]] = {":heartbeat": heartbeat.run}
    if settings.on_done:
        others[":on-done"] = partial(deliver_forever, settings)
    if health is not None:
        others[":health"] = partial(serve_health, settings, agents, *health)
    children = Children(settings, agents, others)

    def forward(signum: int, frame: FrameType | None) -> None:
        children.stopping = True
        children.wake.set()
        children.signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        return children.supervise()
    finally:
        heartbeat.stopped()

