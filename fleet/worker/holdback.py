"""Whether one consumer process takes tasks, and making Celery follow it.

A consumer holds back while its agent is paused (the circuit breaker is
open, on every host), its host is drained, or the agent runs its
`max_running` tasks on all hosts together (a `freed` notice, sent when a run
of the agent ends, makes it look again at once). A Celery consumer bootstep
hands us the consumer; holding back cancels consumption of the agent's
queues (shared and pinned) and resuming re-adds them, through the
consumer's own `call_soon` as Celery's remote control does. The flags in
Redis are the truth; the housekeeper re-reads them on every control notice
and at least every few seconds (a notice can be missed while reconnecting)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps

from fleet.connection import redis_errors
from fleet.credentials.breaker import Breaker
from fleet.state.hosts import HostRegistry

log = logging.getLogger(__name__)


class ConsumptionControl:
    def __init__(self, breaker: Breaker, registry: HostRegistry, agent: str, host: str,
                 queues: list[str], max_running: int | None = None,
                 slots_taken: Callable[[], int] | None = None) -> None:
        """`slots_taken` counts the agent's max_running slots held (on
        Redis's clock, as taking one does: a host whose clock is off does
        not take and put back the same message over and over)."""
        self.breaker = breaker
        self.max_running = max_running
        self.slots_taken = slots_taken
        self.registry = registry
        self.agent = agent
        self.host = host
        self.queues = queues
        self._consumer: Any = None
        self._consuming = True
        self._lock = threading.Lock()

    @property
    def consuming(self) -> bool:
        with self._lock:
            return self._consumer is not None and self._consuming

    def held_back(self) -> str | None:
        """Re-read the flags, bring consumption in line, and say why this
        consumer may not take tasks now (None: it may)."""
        reason = None
        with redis_errors(), self.breaker.redis.pipeline(transaction=False) as pipe:  # both flags, one trip
            pipe.exists(self.breaker.keys.paused(self.agent))
            pipe.exists(self.registry.keys.drain(self.host))
            paused, drained = pipe.execute()
        if paused:
            reason = f"agent {self.agent} is paused"
        elif drained:
            reason = f"host {self.host} is drained"
        elif self.max_running is not None and self.slots_taken is not None \
                and self.slots_taken() >= self.max_running:
            reason = f"agent {self.agent} runs its max_running={self.max_running} tasks"
        with self._lock:
            consumer = self._consumer
            if consumer is None or (reason is None) == self._consuming:
                return reason
            self._consuming = reason is None
            for queue in self.queues:
                if reason is not None:
                    consumer.call_soon(consumer.cancel_task_queue, queue)
                else:
                    consumer.call_soon(consumer.add_task_queue, queue)
        if reason is not None:
            log.warning("%s: no longer consuming %s", reason, ", ".join(self.queues))
        else:
            log.warning("consuming %s again", ", ".join(self.queues))
        return reason

    def attach(self, consumer: Any) -> None:
        with self._lock:
            self._consumer = consumer
            self._consuming = True
        self.held_back()

    def detach(self) -> None:
        with self._lock:
            self._consumer = None


def install(app: Celery, control: ConsumptionControl) -> None:
    """Attach `control` to the worker's consumer when it starts (and restarts)."""

    class ConsumptionStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            control.attach(parent)

        def stop(self, parent: Any) -> None:
            control.detach()

    app.steps["consumer"].add(ConsumptionStep)
