"""The thin consumer: what a Celery worker does with one message of an
agent's queue. It does no agent work itself: it claims the task, makes sure
the agent's container is up, forwards the job into it, records the output and
the outcome, and republishes the task when the outcome is a retry."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

from celery import Celery
from docker.models.containers import Container

from fleet.container.manager import ContainerManager
from fleet.dispatch import TASK_NAME
from fleet.errors import EngineError, StaleTransition, TaskNotFound
from fleet.forward import ExitStatus, Forwarder, Job
from fleet.outcome import Outcome, classify, retry_or_fail
from fleet.output import OutputRecorder
from fleet.record import ErrorKind, State, TaskRecord, now_iso
from fleet.settings import AgentSpec, FleetSettings
from fleet.store import TaskStore

log = logging.getLogger(__name__)

Republish = Callable[[str, str, float], None]


class TaskRunner:
    def __init__(self, settings: FleetSettings, store: TaskStore, containers: ContainerManager,
                 forwarder: Forwarder, republish: Republish) -> None:
        self.settings = settings
        self.store = store
        self.containers = containers
        self.forwarder = forwarder
        self.republish = republish
        self.rng = random.Random()

    def run(self, task_id: str) -> None:
        try:
            record = self.store.get(task_id)
        except TaskNotFound:
            log.warning("task %s has no record (expired?); dropping its message", task_id)
            return
        if record.state.final:
            log.info("task %s is already %s; not running it again", task_id, record.state)
            return
        spec = self.settings.agent(record.agent)
        try:
            with self.containers.use(record.agent) as container:
                started = self.start_attempt(task_id, container)
                if started is None:
                    return
                record = started
                output = OutputRecorder(self.store, task_id, self.settings.log_limit)
                status = self.forwarder.run(container, self.job(record, spec), output.write)
        except EngineError as error:
            self.engine_failed(task_id, error, spec)
            return
        outcome = classify(status, agent=record.agent, attempt=record.attempts, spec=spec,
                           last_stdout_line=output.last_line("stdout"),
                           last_stderr_line=output.last_line("stderr"), rng=self.rng)
        self.finish(record, outcome, status)

    def start_attempt(self, task_id: str, container: Container) -> TaskRecord | None:
        try:
            return self.store.transition(
                task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1},
                host=self.settings.host, container=container.short_id, started_at=now_iso(),
                error=None, exit_code=None,
            )
        except StaleTransition as error:  # cancelled or finished meanwhile
            log.info("not running task %s: %s", task_id, error)
            return None

    def job(self, record: TaskRecord, spec: AgentSpec) -> Job:
        return Job(
            task_id=record.id, agent=record.agent, attempt=record.attempts,
            payload=json.dumps(self.store.payload(record.id)).encode(),
            command=list(spec.command), user=str(self.settings.agent_uid),
            timeout_s=spec.timeout_s,
        )

    def engine_failed(self, task_id: str, error: EngineError, spec: AgentSpec) -> None:
        """The container could not be made or the job not forwarded: an
        attempt that crashed, retried like a transient failure."""
        record = self.store.get(task_id)
        attempt = record.attempts if record.state == State.RUNNING else record.attempts + 1
        outcome = retry_or_fail(ErrorKind.CRASH, str(error), attempt=attempt,
                                retries=spec.transient_retries, spec=spec, rng=self.rng)
        log.warning("task %s attempt %d crashed: %s", task_id, attempt, error)
        self.finish(record.model_copy(update={"attempts": attempt}), outcome, None)

    def finish(self, record: TaskRecord, outcome: Outcome, status: ExitStatus | None) -> None:
        fields: dict[str, Any] = {
            "exit_code": None if status is None else status.code,
            "error": outcome.error,
            "attempts": record.attempts,
        }
        if outcome.state.final:
            fields.update(result=outcome.result, finished_at=now_iso())
        try:
            self.store.transition(record.id, outcome.state, **fields)
        except StaleTransition as error:  # e.g. cancelled while it ran
            log.info("outcome of task %s not recorded: %s", record.id, error)
            return
        if outcome.state == State.RETRYING and outcome.retry_in is not None:
            self.store.add_event(record.id, "retry", delay=f"{outcome.retry_in:.3f}")
            self.republish(record.id, record.agent, outcome.retry_in)
        log.info("task %s attempt %d: %s", record.id, record.attempts, outcome.state)


def register_consumer(app: Celery, runner: TaskRunner) -> None:
    """Bind the task name the publisher sends to the runner."""

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def run(task_id: str, agent: str) -> None:
        runner.run(task_id)
