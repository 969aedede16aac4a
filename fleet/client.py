"""FleetClient: the orchestrator's side. It writes the task record and
publishes by task name; it never imports consumer code."""

from __future__ import annotations

import json
from typing import Any

import kombu.exceptions
import redis

from fleet.alerts import Alerts
from fleet.breaker import Breaker
from fleet.dispatch import make_celery, publish, republish, waiting_messages
from fleet.errors import StateStoreError, UsageError, WaitTimeout
from fleet.hosts import HostRegistry
from fleet.record import ErrorKind, State, TaskError, TaskRecord, now_iso
from fleet.settings import FleetSettings, load_settings
from fleet.store import TaskStore, connect_redis, redis_errors


class FleetClient:
    def __init__(self, settings: FleetSettings, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.store = TaskStore(redis_client or connect_redis(settings),
                               settings.namespace, settings.retention_s)
        self.app = make_celery(settings)
        self.alerts = Alerts(self.store.redis, self.store.keys, settings.alert_command)
        self.breaker = Breaker(self.store.redis, self.store.keys, self.alerts)
        self.hosts = HostRegistry(self.store.redis, self.store.keys, settings.heartbeat_s)

    @classmethod
    def from_settings(cls, **overrides: Any) -> FleetClient:
        return cls(load_settings(**overrides))

    def check_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise UsageError(f"payload must be a JSON object, not {type(payload).__name__}")
        size = len(json.dumps(payload).encode())
        if size > self.settings.payload_limit:
            raise UsageError(f"payload is {size} bytes, over payload_limit="
                             f"{self.settings.payload_limit}")

    def check_host(self, agent: str, host: str) -> None:
        """A task may be pinned only to a registered host that serves its agent."""
        self.settings.check_serves(agent, host)
        served = self.hosts.get(host).registration.agents
        if agent not in served:
            raise UsageError(f"host {host!r} does not serve agent {agent!r} "
                             f"(it serves: {', '.join(served)})")

    def submit(self, agent: str, payload: dict[str, Any], key: str | None = None,
               host: str | None = None) -> str:
        """Queue a task for `agent`; returns its id. With `host`, the task
        runs only on that host (its pinned queue there), retries included. A
        key already used returns that task's id and publishes nothing."""
        self.settings.agent(agent)
        self.check_payload(payload)
        if host is not None:
            self.check_host(agent, host)
        task_id, created = self.store.create(agent, payload, key, pinned_host=host)
        if created:
            try:
                publish(self.app, self.settings, task_id, agent, host=host)
            except (kombu.exceptions.KombuError, OSError, redis.RedisError) as error:
                self.store.transition(task_id, State.FAILED, finished_at=now_iso(), error=TaskError(
                    kind=ErrorKind.LOST, message=f"could not publish: {error}"))
                raise StateStoreError(f"could not publish task {task_id}: {error}") from None
        return task_id

    def status(self, task_id: str) -> TaskRecord:
        return self.store.get(task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        record = self.store.wait_final(task_id, timeout)
        if record is None:
            raise WaitTimeout(task_id, timeout or 0)
        return record

    def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a queued, retrying or running task; a finished one is
        returned unchanged."""
        record = self.store.get(task_id)
        if record.state.final:
            return record
        cancelled = self.store.transition(task_id, State.CANCELLED, finished_at=now_iso(),
                                          error=TaskError(kind=ErrorKind.CANCELLED,
                                                          message="cancelled by request"))
        # The consumer running it (on any host) ends its processes now; its
        # housekeeper would notice the record within a lease period anyway.
        self.store.redis.publish(self.store.keys.control, f"cancel {task_id}")
        return cancelled

    def tasks(self, agent: str | None = None, state: State | str | None = None) -> list[TaskRecord]:
        if agent is not None:
            self.settings.agent(agent)
        return self.store.list_tasks(agent=agent, state=State(state) if state else None)

    def resume(self, agent: str, why: str) -> bool:
        """Close the agent's breaker on every host; False if it was not open."""
        self.settings.agent(agent)
        return self.breaker.resume(agent, why)

    def token_rotated(self, agent: str, name: str) -> list[str]:
        """After `fleet tokens set`: resume the agent and run at once the
        tasks waiting to retry a credential failure (their delayed retry,
        when it comes, finds the attempt started and is dropped)."""
        self.resume(agent, f"token {name} rotated")
        retried = []
        for record in self.store.list_tasks(agent=agent, state=State.RETRYING):
            if record.error is not None and record.error.kind == ErrorKind.CREDENTIAL:
                republish(self.app, self.settings, record, record.attempts + 1)
                retried.append(record.id)
        return retried

    def queue_depth(self, agent: str) -> int:
        """Messages waiting in the agent's shared queue and its queues pinned
        to the registered hosts."""
        from fleet.routing import queue_name

        hosts = [None, *(h.registration.host_id for h in self.hosts.all())]
        queues = [queue_name(self.settings.namespace, agent, host) for host in hosts]
        with redis_errors():
            return waiting_messages(self.store.redis, self.store.keys, queues)
