"""The tasks one consumer process is running, and ending them.

Fleet ends a running task for a reason — its timeout, a cancel, a hand-back
at shutdown, a lost lease — by killing its processes inside the container;
the consumer then reads the reason to record the right outcome. One thread
per process watches the timeouts (not a timer thread per task).

Ending a task through the supervisor needs the supervisor's cooperation. So
each task has a second, host-side deadline — its timeout, the kill grace and
FORCE_MARGIN_S — past which, if its run has still not returned, the
container itself is killed from outside (`force`) and replaced."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from docker.models.containers import Container

from fleet.errors import FleetError
from fleet.forwarding.base import Forwarder, Job

log = logging.getLogger(__name__)

TIMEOUT = "timeout"
CANCELLED = "cancelled"
HANDBACK = "handback"
LEASE_LOST = "lease-lost"
FORCE_MARGIN_S = 10.0  # after timeout + kill grace: the supervisor has not ended the task
Force = Callable[["RunningTask"], None]


@dataclass
class RunningTask:
    job: Job
    container: Container
    serial: int  # tells this run from a later run of the same task id
    renewed_at: float  # the lease's last renewal (monotonic)
    reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, reason: str) -> bool:
        """Record why fleet ends it; the first reason wins."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
            return True


class RunningTasks:
    def __init__(self, forwarder: Forwarder, kill_grace_s: float, force: Force | None = None) -> None:
        self.forwarder = forwarder
        self.kill_grace_s = kill_grace_s
        self.force = force
        self._tasks: dict[str, RunningTask] = {}
        # A heap of (monotonic, serial, task id, forced): the timeout, and the host-side deadline.
        self._deadlines: list[tuple[float, int, str, bool]] = []
        self._serials = itertools.count()
        self.in_flight = 0  # messages being handled: from receipt until their outcome is stored
        self._lock = threading.Condition()
        threading.Thread(target=self._watch_deadlines, name="timeouts", daemon=True).start()

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Count a message as in hand (a drained host is not drained while one is)."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def add(self, job: Job, container: Container, timeout_s: float, renewed_at: float) -> RunningTask:
        """A task starts; it is ended (TIMEOUT) if still running after
        `timeout_s`. `renewed_at`: when its lease was taken (monotonic)."""
        task = RunningTask(job, container, serial=next(self._serials), renewed_at=renewed_at)
        with self._lock:
            self._tasks[job.task_id] = task
            timeout_at = time.monotonic() + timeout_s
            heapq.heappush(self._deadlines, (timeout_at, task.serial, job.task_id, False))
            if self.force is not None:
                forced_at = timeout_at + self.kill_grace_s + FORCE_MARGIN_S
                heapq.heappush(self._deadlines, (forced_at, task.serial, job.task_id, True))
            if len(self._deadlines) > 4 * len(self._tasks) + 1000:  # mostly finished tasks
                self._deadlines = [d for d in self._deadlines if self._run(d[2], d[1]) is not None]
                heapq.heapify(self._deadlines)
            self._lock.notify()
        return task

    def _run(self, task_id: str, serial: int) -> RunningTask | None:
        """That very run, if it still goes on (not finished, not a later run of that id)."""
        task = self._tasks.get(task_id)
        return task if task is not None and task.serial == serial else None

    def _watch_deadlines(self) -> None:
        while True:
            with self._lock:
                while not self._deadlines or self._deadlines[0][0] > time.monotonic():
                    self._lock.wait(self._deadlines[0][0] - time.monotonic() if self._deadlines else None)
                _, serial, task_id, forced = heapq.heappop(self._deadlines)
                task = self._run(task_id, serial)
            if task is None:
                continue
            if not forced:
                self._end(task, TIMEOUT, self.kill_grace_s)
            elif self.force is not None:
                log.error("task %s is still running %.0f s past its timeout: killing its container",
                          task_id, self.kill_grace_s + FORCE_MARGIN_S)
                task.mark(TIMEOUT)
                try:
                    self.force(task)
                except FleetError as error:
                    log.error("could not kill the container of task %s: %s", task_id, error)

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def all(self) -> list[RunningTask]:
        with self._lock:
            return list(self._tasks.values())

    def end(self, task_id: str, reason: str, grace_s: float | None = None) -> bool:
        """End a running task in the background; False if it is not running here."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            return False
        return self._end(task, reason, self.kill_grace_s if grace_s is None else grace_s)

    def _end(self, task: RunningTask, reason: str, grace_s: float) -> bool:
        if not task.mark(reason):
            return False
        log.info("ending task %s (%s)", task.job.task_id, reason)
        threading.Thread(target=self._kill, args=(task, grace_s), daemon=True).start()
        return True

    def _kill(self, task: RunningTask, grace_s: float) -> None:
        try:
            self.forwarder.kill(task.container, task.job, grace_s)
        except FleetError as error:
            log.error("could not end task %s: %s", task.job.task_id, error)
