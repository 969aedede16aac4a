"""`fleet worker`: the consumers of this host. One child process per agent,
each a Celery worker bound to that agent's queue with `concurrency` thread
slots; the parent prepares the containers, removes orphans, forwards
signals, restarts a child that dies, and exits when told to stop.

Run as `python -m fleet.worker AGENT` to be one agent's consumer."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from types import FrameType
from typing import Any

from fleet.container.manager import ContainerManager
from fleet.engine import connect
from fleet.settings import FleetSettings, load_settings

log = logging.getLogger("fleet.worker")

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


def serve_agent(settings: FleetSettings, agent: str) -> int:
    """Consume one agent's queue in this process until told to stop."""
    from celery.exceptions import SecurityWarning
    from celery.signals import worker_shutting_down

    from fleet.alerts import Alerts
    from fleet.breaker import Breaker
    from fleet.channel.forwarder import ChannelForwarder
    from fleet.consumer import Credentials, TaskRunner, register_consumer
    from fleet.dispatch import make_celery, publish
    from fleet.forward import ExecForwarder, Forwarder
    from fleet.housekeeping import Housekeeper
    from fleet.pause import PauseControl, install
    from fleet.routing import queue_name
    from fleet.running import HANDBACK, RunningTasks
    from fleet.store import TaskStore, connect_redis
    from fleet.tokens import TokenStore

    # The consumer drives the Docker engine, which is root-equivalent anyway;
    # Celery's warning about running as root says nothing new here.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    spec = settings.agent(agent)
    queue = queue_name(settings.namespace, agent)
    owner = f"{settings.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    app = make_celery(settings)
    manager = ContainerManager(connect(), settings)
    store = TaskStore(connect_redis(settings.redis_url), settings.namespace, settings.retention_s)
    alerts = Alerts(store.redis, store.keys, settings.alert_command)
    breaker = Breaker(store.redis, store.keys, alerts)
    pause = PauseControl(breaker, agent, queue)
    install(app, pause)
    forwarder: Forwarder = (ChannelForwarder(str(settings.agent_uid), settings.kill_grace_s)
                            if settings.forwarding == "channel" else ExecForwarder())
    running = RunningTasks(forwarder, settings.kill_grace_s)

    def republish(task_id: str, task_agent: str, attempt: int, delay: float) -> None:
        publish(app, settings, task_id, task_agent, attempt=attempt, countdown=delay)

    def queue_depth() -> int:
        return int(store.redis.llen(store.keys.queue(queue)))  # type: ignore[arg-type]

    credentials = Credentials(TokenStore(settings), breaker, alerts, pause.is_paused)
    register_consumer(app, TaskRunner(settings, store, manager, forwarder, running, republish,
                                      credentials, owner))
    housekeeper = Housekeeper(store, agent, owner, settings.lease_ttl_s, running, pause, republish,
                              queue_depth)

    def hand_back() -> None:
        for task in running.all():
            running.end(task.job.task_id, HANDBACK)

    @worker_shutting_down.connect
    def on_shutdown(**_: Any) -> None:
        # Running tasks may finish within the grace period; then they are
        # ended and handed back (published again) for another consumer.
        timer = threading.Timer(settings.shutdown_grace_s, hand_back)
        timer.daemon = True
        timer.start()

    manager.ensure(agent)
    housekeeper.start()
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
    housekeeper.stop()
    return int(worker.exitcode or 0)


class Children:
    """The consumer processes of this host, restarted when one dies."""

    def __init__(self, agents: list[str]) -> None:
        self.agents = agents
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = dict.fromkeys(agents, 0)
        self.stopping = False

    def start(self, agent: str) -> None:
        # Own sessions: a Ctrl-C reaches the children once, through the parent.
        self.processes[agent] = subprocess.Popen([sys.executable, "-m", "fleet.worker", agent],
                                                 start_new_session=True)

    def signal(self, signum: int) -> None:
        for child in self.processes.values():
            if child.poll() is None:
                child.send_signal(signum)

    def supervise(self) -> int:
        for agent in self.agents:
            self.start(agent)
        while True:
            for agent, child in list(self.processes.items()):
                code = child.poll()
                if code is None:
                    continue
                if self.stopping:
                    self.processes.pop(agent)
                    continue
                delay = RESTART_BACKOFF_S[min(self.restarts[agent], len(RESTART_BACKOFF_S) - 1)]
                self.restarts[agent] += 1
                log.error("consumer of %s exited with %s; restarting it in %d s", agent, code, delay)
                time.sleep(delay)
                self.start(agent)
            if not self.processes:
                return 0
            time.sleep(0.2)


def run_workers(settings: FleetSettings, agents: list[str]) -> int:
    """Start one consumer process per agent and supervise them until stopped."""
    for agent in agents:
        settings.agent(agent)
    manager = ContainerManager(connect(), settings)
    for name in manager.remove_orphans():
        log.info("removed orphaned container %s", name)
    for agent in agents:
        manager.ensure(agent)
    children = Children(agents)

    def forward(signum: int, frame: FrameType | None) -> None:
        children.stopping = True
        children.signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return children.supervise()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    configure_logging()
    sys.exit(serve_agent(load_settings(), sys.argv[1]))
