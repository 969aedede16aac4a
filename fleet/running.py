"""The tasks one consumer process is running, and ending them.

Fleet ends a running task for a reason — its timeout, a cancel, a hand-back
at shutdown, a lost lease — by killing its processes inside the container;
the consumer then reads the reason to record the right outcome. One thread
per process watches the timeouts (not a timer thread per task)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from docker.models.containers import Container

from fleet.errors import FleetError
from fleet.forward import Forwarder, Job

log = logging.getLogger(__name__)

TIMEOUT = "timeout"
CANCELLED = "cancelled"
HANDBACK = "handback"
LEASE_LOST = "lease-lost"


@dataclass
class RunningTask:
    job: Job
    container: Container
    serial: int = 0
    reason: str | None = None
    renewed_at: float = field(default_factory=time.monotonic)  # the lease's last renewal (monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, reason: str) -> bool:
        """Record why fleet ends it; the first reason wins."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
            return True


class RunningTasks:
    def __init__(self, forwarder: Forwarder, kill_grace_s: float) -> None:
        self.forwarder = forwarder
        self.kill_grace_s = kill_grace_s
        self._tasks: dict[str, RunningTask] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # a heap of (monotonic, serial, task id)
        self._serials = itertools.count()
        self._lock = threading.Condition()
        threading.Thread(target=self._watch_deadlines, name="timeouts", daemon=True).start()

    def add(self, job: Job, container: Container, timeout_s: float | None = None) -> RunningTask:
        """A task starts; with `timeout_s`, it is ended (TIMEOUT) if still running then."""
        task = RunningTask(job, container, serial=next(self._serials))
        with self._lock:
            self._tasks[job.task_id] = task
            if timeout_s is not None:
                heapq.heappush(self._deadlines, (time.monotonic() + timeout_s, task.serial, job.task_id))
                if len(self._deadlines) > 2 * len(self._tasks) + 1000:  # mostly finished tasks
                    self._deadlines = [d for d in self._deadlines if self._is_current(d[2], d[1])]
                    heapq.heapify(self._deadlines)
                self._lock.notify()
        return task

    def _is_current(self, task_id: str, serial: int) -> bool:
        """Still the same run (not finished, not a later run of that id)."""
        task = self._tasks.get(task_id)
        return task is not None and task.serial == serial

    def _watch_deadlines(self) -> None:
        while True:
            with self._lock:
                while not self._deadlines or self._deadlines[0][0] > time.monotonic():
                    self._lock.wait(self._deadlines[0][0] - time.monotonic() if self._deadlines else None)
                _, serial, task_id = heapq.heappop(self._deadlines)
                current = self._is_current(task_id, serial)
            if current:
                self.end(task_id, TIMEOUT)

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def all(self) -> list[RunningTask]:
        with self._lock:
            return list(self._tasks.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def end(self, task_id: str, reason: str, grace_s: float | None = None) -> bool:
        """End a running task in the background; False if it is not running here."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or not task.mark(reason):
            return False
        grace = self.kill_grace_s if grace_s is None else grace_s
        log.info("ending task %s (%s)", task_id, reason)
        threading.Thread(target=self._kill, args=(task, grace), daemon=True).start()
        return True

    def _kill(self, task: RunningTask, grace_s: float) -> None:
        try:
            self.forwarder.kill(task.container, task.job, grace_s)
        except FleetError as error:
            log.error("could not end task %s: %s", task.job.task_id, error)
