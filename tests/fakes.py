"""Fakes shared by the unit tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from docker.models.containers import Container

from fleet.forwarding.base import Job
from fleet.worker.running import RunningTasks

GRACE_S = 7.0  # the kill grace of the running-task tables made here


@dataclass
class Kill:
    container: Container
    job: Job
    grace_s: float


@dataclass
class FakeForwarder:
    """Records every kill; `killed(task_id)` is set when that task's kill arrives."""

    kills: list[Kill] = field(default_factory=list)
    events: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def killed(self, task_id: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(task_id, threading.Event())

    def kill(self, container: Container, job: Job, grace_s: float,
             sweep: list[str] | None = None) -> int:
        with self.lock:
            self.kills.append(Kill(container, job, grace_s))
        self.killed(job.task_id).set()
        return 1

    def kills_of(self, task_id: str) -> list[Kill]:
        with self.lock:
            return [k for k in self.kills if k.job.task_id == task_id]


def job(task_id: str, attempt: int = 1) -> Job:
    return Job(task_id=task_id, agent="dev", attempt=attempt, payload=b"{}", command=["agent"],
               user="10001")


@pytest.fixture
def forwarder() -> FakeForwarder:
    return FakeForwarder()


@pytest.fixture
def running(forwarder: FakeForwarder) -> RunningTasks:
    return RunningTasks(forwarder, kill_grace_s=GRACE_S)  # type: ignore[arg-type]
