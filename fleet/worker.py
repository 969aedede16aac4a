"""`fleet worker`: the consumers of this host. One child process per agent,
each a Celery worker bound to that agent's queue with `concurrency` thread
slots; the parent prepares the containers, removes orphans, forwards signals
and exits when the children do.

Run as `python -m fleet.worker AGENT` to be one agent's consumer."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from types import FrameType

from fleet.container.manager import ContainerManager
from fleet.engine import connect
from fleet.settings import FleetSettings, load_settings

log = logging.getLogger("fleet.worker")


def serve_agent(settings: FleetSettings, agent: str) -> int:
    """Consume one agent's queue in this process until told to stop."""
    from fleet.alerts import Alerts
    from fleet.breaker import Breaker
    from fleet.consumer import Credentials, TaskRunner, register_consumer
    from fleet.dispatch import make_celery, publish
    from fleet.forward import ExecForwarder
    from fleet.pause import PauseControl, install
    from fleet.routing import queue_name
    from fleet.store import TaskStore, connect_redis
    from fleet.tokens import TokenStore

    spec = settings.agent(agent)
    queue = queue_name(settings.namespace, agent)
    app = make_celery(settings)
    manager = ContainerManager(connect(), settings)
    store = TaskStore(connect_redis(settings.redis_url), settings.namespace, settings.retention_s)
    alerts = Alerts(store.redis, store.keys, settings.alert_command)
    breaker = Breaker(store.redis, store.keys, alerts)
    pause = PauseControl(breaker, agent, queue)
    install(app, pause)

    def republish(task_id: str, task_agent: str, attempt: int, delay: float) -> None:
        publish(app, settings, task_id, task_agent, attempt=attempt, countdown=delay)

    credentials = Credentials(TokenStore(settings), breaker, alerts, pause.is_paused)
    register_consumer(app, TaskRunner(settings, store, manager, ExecForwarder(), republish,
                                      credentials))
    manager.ensure(agent)
    worker = app.Worker(
        hostname=f"{agent}@{settings.host}",
        queues=[queue],
        concurrency=spec.concurrency,
        pool="threads",
        loglevel="INFO",
        # Gossip, mingle and event heartbeats are broadcast chatter fleet
        # does not use; without them a worker starts in well under a second.
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


def run_workers(settings: FleetSettings, agents: list[str]) -> int:
    """Start one consumer process per agent and wait for them."""
    for agent in agents:
        settings.agent(agent)
    manager = ContainerManager(connect(), settings)
    for name in manager.remove_orphans():
        log.info("removed orphaned container %s", name)
    for agent in agents:
        manager.ensure(agent)
    # Own sessions: a Ctrl-C reaches the children once, through the parent.
    children = [subprocess.Popen([sys.executable, "-m", "fleet.worker", agent],
                                 start_new_session=True) for agent in agents]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    configure_logging()
    sys.exit(serve_agent(load_settings(), sys.argv[1]))
