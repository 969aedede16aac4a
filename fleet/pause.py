"""Honouring an agent's paused flag inside one consumer process.

A Celery consumer bootstep hands us the consumer; a watcher thread listens on
the control channel and re-reads the flag at least every `RECHECK_S` (a
pub/sub notice can be missed while reconnecting; the flag in Redis cannot).
Pausing cancels consumption of the agent's queue and resuming re-adds it,
through the consumer's own `call_soon` as Celery's remote control does."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery, bootsteps

from fleet.breaker import Breaker

log = logging.getLogger(__name__)

RECHECK_S = 5.0


class PauseControl:
    def __init__(self, breaker: Breaker, agent: str, queue: str) -> None:
        self.breaker = breaker
        self.agent = agent
        self.queue = queue
        self._consumer: Any = None
        self._consuming = True
        self._lock = threading.Lock()
        self._stopped = threading.Event()

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
        self._stopped.clear()
        self.is_paused()
        threading.Thread(target=self._watch, name=f"pause-{self.agent}", daemon=True).start()

    def detach(self) -> None:
        self._stopped.set()
        with self._lock:
            self._consumer = None

    def _watch(self) -> None:
        while not self._stopped.is_set():
            try:
                pubsub = self.breaker.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.breaker.keys.control)
                while not self._stopped.is_set():
                    pubsub.get_message(timeout=RECHECK_S)
                    self.is_paused()
            except redis.RedisError as error:
                log.warning("pause watcher for %s: %s; retrying", self.agent, error)
                self._stopped.wait(RECHECK_S)


def install(app: Celery, control: PauseControl) -> None:
    """Attach `control` to the worker's consumer when it starts (and restarts)."""

    class PauseStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            control.attach(parent)

        def stop(self, parent: Any) -> None:
            control.detach()

    app.steps["consumer"].add(PauseStep)
