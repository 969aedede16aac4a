"""`fleet worker`: the consumers of this host. One child process per agent,
each a Celery worker bound to that agent's queues with `concurrency` thread
slots, each making sure of its agent's container; the parent checks the
images, removes orphans, registers the host (a child process renews the
heartbeat), forwards signals, restarts a child that dies, and exits when
told to stop. Children are forked from the parent, which has imported
everything they need."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from functools import partial
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from celery.exceptions import SecurityWarning
from celery.signals import worker_shutting_down

from fleet.alerts import Alerts
from fleet.breaker import Breaker
from fleet.channel.forwarder import ChannelForwarder
from fleet.consumer import Credentials, TaskRunner, register_consumer
from fleet.consumption import ConsumptionControl, install
from fleet.container.manager import ContainerManager
from fleet.container.spec import LABEL_SPEC_HASH
from fleet.dispatch import make_celery, republish, waiting_messages
from fleet.engine import connect
from fleet.errors import FleetError, UsageError
from fleet.forward import ExecForwarder, Forwarder
from fleet.hosts import HostRegistry, Registration
from fleet.housekeeping import Housekeeper
from fleet.keys import Keys
from fleet.record import TaskRecord
from fleet.routing import queue_name
from fleet.running import HANDBACK, RunningTasks
from fleet.settings import FleetSettings
from fleet.store import TaskStore, connect_redis
from fleet.tokens import TokenStore

log = logging.getLogger("fleet.worker")

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
HEARTBEAT = ":heartbeat"  # the heartbeat child's name beside the agents' (no agent name has a colon)
STABLE_AFTER_S = 60.0  # a consumer up this long before it died restarts without backoff


def serve_agent(settings: FleetSettings, agent: str) -> int:
    """Consume one agent's queues on this host (its shared queue and the one
    of its tasks pinned here) in this process until told to stop."""
    # The consumer drives the Docker engine, which is root-equivalent anyway;
    # Celery's warning about running as root says nothing new here.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    spec = settings.agent(agent)
    queues = [queue_name(settings.namespace, agent), queue_name(settings.namespace, agent, settings.host)]
    owner = f"{settings.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    app = make_celery(settings, host=settings.host)
    manager = ContainerManager(connect(), settings)
    store = TaskStore(connect_redis(settings, **redis_timeouts(settings)), settings.namespace,
                      settings.retention_s)
    alerts = Alerts(store.redis, store.keys, settings.alert_command)
    breaker = Breaker(store.redis, store.keys, alerts)
    registry = HostRegistry(store.redis, store.keys, settings.heartbeat_s)
    control = ConsumptionControl(breaker, registry, agent, settings.host, queues)
    install(app, control)
    forwarder: Forwarder = (ChannelForwarder(str(settings.agent_uid), settings.kill_grace_s)
                            if settings.forwarding == "channel" else ExecForwarder())
    running = RunningTasks(forwarder, settings.kill_grace_s)

    def publish_again(record: TaskRecord, attempt: int, delay: float) -> None:
        republish(app, settings, record, attempt, delay)

    def queue_depth() -> int:
        return waiting_messages(store.redis, store.keys, queues)

    credentials = Credentials(TokenStore(settings), breaker, alerts)
    register_consumer(app, TaskRunner(settings, store, manager, forwarder, running, publish_again,
                                      credentials, control.held_back, owner))
    housekeeper = Housekeeper(store, registry, agent, owner, settings.lease_ttl_s, running, control,
                              publish_again, queue_depth, settings.lost_message_after_s)

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
        queues=queues,
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


def end_with_parent(parent: int) -> None:
    """A consumer whose `fleet worker` died (SIGKILL, OOM) gets SIGTERM — a
    warm shutdown that hands its tasks back — rather than run on unseen: its
    host no longer beats, so it is shown lost and its tasks are taken over."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked (we were re-parented)
        os.kill(os.getpid(), signal.SIGTERM)


class Children:
    """The consumer processes of this host and its heartbeat, restarted when
    one dies.

    Each is forked from this process, which has imported everything a
    consumer needs: a consumer starts in a fraction of the CPU a fresh
    interpreter would take, and shares those pages with its siblings."""

    def __init__(self, settings: FleetSettings, agents: list[str], heartbeat: Heartbeat) -> None:
        self.settings = settings
        self.agents = [*agents, HEARTBEAT]
        self.heartbeat = heartbeat
        self.processes: dict[str, BaseProcess] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.agents, 0)
        self.started_at: dict[str, float] = {}
        self.stopping = False
        self.wake = threading.Event()  # set when told to stop

    def start(self, agent: str) -> None:
        # A SIGTERM between the fork and the bookkeeping would miss the new
        # child: hold the signals back until it is on the books.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            body: Callable[[], int | None] = (self.heartbeat.run if agent == HEARTBEAT
                                               else partial(serve_agent, self.settings, agent))
            process = multiprocessing.get_context("fork").Process(
                target=run_child, args=(body, os.getpid(), previous), name=f"fleet-{agent}")
            process.start()
            self.processes[agent] = process
            self.started_at[agent] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def signal(self, signum: int) -> None:
        for child in self.processes.values():
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    def supervise(self) -> int:
        for agent in self.agents:
            self.start(agent)
        while True:
            for agent, child in list(self.processes.items()):
                if child.is_alive():
                    continue
                if self.stopping:
                    self.processes.pop(agent)
                    continue
                if time.monotonic() - self.started_at[agent] > STABLE_AFTER_S:
                    self.restarts[agent] = 0  # it had been running fine: a fresh failure
                delay = RESTART_BACKOFF_S[min(self.restarts[agent], len(RESTART_BACKOFF_S) - 1)]
                self.restarts[agent] += 1
                log.error("consumer of %s exited with %s; restarting it in %d s", agent,
                          child.exitcode, delay)
                self.wake.wait(delay)  # a stop cuts the wait short
                if self.stopping:
                    self.processes.pop(agent)
                    continue
                self.start(agent)
            if not self.processes:
                return 0
            time.sleep(0.2)


def run_child(body: Callable[[], int | None], parent: int, mask: set[signal.Signals]) -> None:
    """A forked child of `fleet worker`: a consumer or the heartbeat."""
    # Its own session: a Ctrl-C reaches it once, through the parent. The
    # parent's signal handlers are not its own; Celery installs its own.
    os.setsid()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    end_with_parent(parent)
    sys.exit(body())


def redis_timeouts(settings: FleetSettings) -> dict[str, Any]:
    """A worker's Redis calls give up within a lease renewal period: a call
    hanging on a cut link must not hold the housekeeper past the lease."""
    timeout = max(2.0, settings.lease_ttl_s / 3)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "socket_keepalive": True}


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
        self.registration = self.registration.model_copy(update={"containers": containers})
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


def run_workers(settings: FleetSettings, agents: list[str]) -> int:
    """Start one consumer process per agent and supervise them until stopped.
    Each consumer makes sure of its agent's container before it consumes, so
    the engine and the consumers' start-up work at once; what would fail
    them all (a missing image) is checked here first."""
    agents = agents_served(settings, agents)
    manager = ContainerManager(connect(), settings)
    for image in sorted({settings.agents[agent].image for agent in agents}):
        manager.image_id(image)
    for name in manager.remove_orphans():
        log.info("removed orphaned container %s", name)
    heartbeat = Heartbeat(settings, agents)
    heartbeat.beat(heartbeat.registry(), manager)  # registered before any consumer runs
    children = Children(settings, agents, heartbeat)

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


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
