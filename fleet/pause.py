"""Honouring an agent's paused flag inside one consumer process.

A Celery consumer bootstep hands us the consumer. Pausing cancels
consumption of the agent's queue and resuming re-adds it, through the
consumer's own `call_soon` as Celery's remote control does. The flag in
Redis is the truth; the housekeeper re-reads it on every control notice and
at least every few seconds (a notice can be missed while reconnecting)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

from fleet.breaker import Breaker

log = logging.getLogger(__name__)


class PauseControl:
    def __init__(self, breaker: Breaker, agent: str, queue: str) -> None:
        self.breaker = breaker
        self.agent = agent
        self.queue = queue
        self._consumer: Any = None
        self._consuming = True
        self._lock = threading.Lock()

    def is_paused(self) -> bool:
        """Re-read the flag and bring consumption in line with it."""
        paused = self.breaker.paused(self.agent) is not None
        with self._lock:
            consumer = self._consumer
            if consumer is None or paused != self._consuming:
                return paused
            self._consuming = not paused
            if paused:
                log.warning("agent %s is paused: no longer consuming %s", self.agent, self.queue)
                consumer.call_soon(consumer.cancel_task_queue, self.queue)
            else:
                log.warning("agent %s resumed: consuming %s again", self.agent, self.queue)
                consumer.call_soon(consumer.add_task_queue, self.queue)
        return paused

    def attach(self, consumer: Any) -> None:
        with self._lock:
            self._consumer = consumer
            self._consuming = True
        self.is_paused()

    def detach(self) -> None:
        with self._lock:
            self._consumer = None


def install(app: Celery, control: PauseControl) -> None:
    """Attach `control` to the worker's consumer when it starts (and restarts)."""

    class PauseStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            control.attach(parent)

        def stop(self, parent: Any) -> None:
            control.detach()

    app.steps["consumer"].add(PauseStep)
