"""One consumer process of `fleet worker`: a Celery worker bound to one
agent's queues (shared and pinned to this host) with `concurrency` thread
slots, wired to the task runner, the housekeeper and consumption control."""

from __future__ import annotations

import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from celery.exceptions import Reject, SecurityWarning
from celery.signals import worker_shutting_down
from docker.models.containers import Container

from fleet.broker.celery_app import make_celery
from fleet.broker.publish import republish
from fleet.broker.queues import waiting_messages
from fleet.broker.routing import queue_name
from fleet.connection import connect_redis
from fleet.container.engine import connect
from fleet.container.manager import ContainerManager
from fleet.credentials.alerts import CONTAINER_CONDEMNED, Alerts
from fleet.credentials.breaker import Breaker
from fleet.credentials.identity import proxy_id
from fleet.credentials.masking import Masker
from fleet.credentials.tokens import TokenStore
from fleet.egress.decisions import Decision, DecisionListener
from fleet.egress.layout import EgressLayout
from fleet.egress.proxy import EgressProxy
from fleet.errors import FleetError
from fleet.forwarding.base import Forwarder
from fleet.forwarding.channel import ChannelForwarder
from fleet.forwarding.exec import ExecForwarder
from fleet.record import TaskRecord
from fleet.settings import FleetSettings
from fleet.state.control import revoke
from fleet.state.hosts import HostRegistry
from fleet.state.store import TaskStore
from fleet.worker.celery_control import install_revoke
from fleet.worker.effects import Credentials
from fleet.worker.holdback import ConsumptionControl, install
from fleet.worker.housekeeping import Housekeeper
from fleet.worker.logs import serving
from fleet.worker.runner import TaskRunner, register_consumer
from fleet.worker.running import HANDBACK, RunningTasks

log = logging.getLogger("fleet.worker")

# What an egress event of a task holds (never a path, a header or a body).
EGRESS_FIELDS = ("destination", "method", "decision", "status", "bytes_out", "bytes_in", "reason", "error")


def serve_agent(settings: FleetSettings, agent: str) -> int:
    """Consume one agent's queues on this host (its shared queue and the one
    of its tasks pinned here) in this process until told to stop."""
    # The consumer drives the Docker engine, which is root-equivalent anyway;
    # Celery's warning about running as root says nothing new here.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    serving(agent)
    logging.getLogger("celery.app.trace").addFilter(put_back_without_traceback)
    spec = settings.agent(agent)
    queues = [queue_name(settings.namespace, agent), queue_name(settings.namespace, agent, settings.host)]
    owner = f"{settings.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    app = make_celery(settings, host=settings.host)
    app.conf.worker_consumer = "fleet.worker.celery_consumer:FleetConsumer"
    manager = ContainerManager(connect(), settings)
    store = TaskStore(connect_redis(settings, **redis_timeouts(settings)), settings.namespace,
                      settings.retention_s, settings.on_done_hooks)
    alerts = Alerts(store.redis, store.keys, settings.alert_command)
    breaker = Breaker(store.redis, store.keys, alerts)
    registry = HostRegistry(store.redis, store.keys, settings.heartbeat_s)
    control = ConsumptionControl(breaker, registry, agent, settings.host, queues, spec.max_running,
                                 lambda: store.leases.slots_taken(agent))
    install(app, control)
    install_revoke(lambda task_id: log.info("task %s revoked through Celery: %s", task_id, revoke(
        store, task_id, "revoked through Celery (celery control revoke)")))
    tokens = TokenStore(settings)

    def mask(text: str) -> str:
        return Masker(tokens.values(agent)).mask(text)

    def condemn(container: Container, why: str) -> None:
        """Kill a container fleet no longer trusts, and say so once."""
        if not manager.condemn(agent, container, why):
            return
        try:
            alerts.emit(CONTAINER_CONDEMNED, agent, f"container {container.name} of agent {agent} "
                        f"is no longer trusted and was killed; a new one serves the next task: {why}",
                        container=str(container.name), host=settings.host)
        except FleetError as error:
            log.error("could not raise the alert for container %s: %s", container.name, error)

    user = str(manager.spec(agent).uid)  # the agent's own (allocated on first need)
    forwarder: Forwarder = (ChannelForwarder(user, settings.kill_grace_s, mask=mask)
                            if settings.forwarding == "channel" else ExecForwarder())
    running = RunningTasks(forwarder, settings.kill_grace_s,
                           force=lambda task: condemn(task.container, f"task {task.job.task_id} ran past "
                                                      "its timeout and the supervisor did not end it"))

    def publish_again(record: TaskRecord, attempt: int, delay: float) -> None:
        republish(app, settings, record, attempt, delay)

    def queue_depth() -> int:
        return waiting_messages(store.redis, store.keys, queues)

    credentials = Credentials(tokens, breaker, alerts)
    runner = TaskRunner(settings, store, manager, forwarder, running, publish_again, credentials,
                        control.held_back, owner, condemn, user, agent)
    register_consumer(app, runner)
    app.conf.fleet_unreadable = runner.reject_unreadable
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

    decisions = (listen_for_egress(settings, agent, store, running, mask, manager.egress)
                 if spec.egress else None)
    if spec.inject:
        tokens.place_placeholders(agent)
    manager.ensure(agent)
    housekeeper.start()
    worker = app.Worker(
        hostname=f"{agent}@{settings.host}",
        queues=queues,
        concurrency=spec.concurrency,
        pool="threads",
        loglevel="INFO",
        # Gossip and mingle are broadcast chatter fleet does not use; without
        # them a worker starts in well under a second. Its event heartbeats
        # (every 2 s) are what Flower and `celery status` tell a live worker by.
        without_gossip=True,
        without_mingle=True,
        quiet=True,
    )
    worker.start()
    housekeeper.stop()
    if decisions is not None:
        decisions.stop()
    return int(worker.exitcode or 0)


def listen_for_egress(settings: FleetSettings, agent: str, store: TaskStore, running: RunningTasks,
                      mask: Callable[[str], str], egress: EgressProxy) -> DecisionListener:
    """Record the egress proxy's decisions about this agent's traffic in the
    events of the task they belong to (if it runs in this consumer), masked."""
    layout = EgressLayout(settings)

    def record(decision: Decision) -> None:
        fields = {key: mask(str(decision.get(key, ""))) for key in EGRESS_FIELDS if key in decision}
        task_id, attempt = str(decision.get("task", "")), str(decision.get("attempt", ""))
        task = next((t for t in running.all() if t.job.task_id == task_id
                     and str(t.job.attempt) == attempt), None)
        if task is None:
            log.info("egress of agent %s outside a task of this consumer: %s", agent, fields)
            return
        try:
            store.events.add(task_id, "egress", epoch=task.job.attempt, **fields)
        except FleetError as error:  # the attempt moved on, or Redis is away: enforced all the same
            log.info("egress decision of task %s not recorded: %s", task_id, error)

    egress.make_directories(agent)
    listener = DecisionListener(layout.decisions_dir(agent), proxy_id(settings), record)
    listener.start()
    return listener


def redis_timeouts(settings: FleetSettings) -> dict[str, Any]:
    """A worker's Redis calls give up within a lease renewal period: a call
    hanging on a cut link must not hold the housekeeper past the lease."""
    timeout = max(2.0, settings.lease_ttl_s / 3)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "socket_keepalive": True}


def put_back_without_traceback(record: logging.LogRecord) -> bool:
    """Celery logs every message put back (Reject) with a traceback; one
    held back (paused, drained, at max_running) is no error: one line."""
    if record.exc_info and isinstance(record.exc_info[1], Reject):
        record.exc_info = record.exc_text = None
    return True
