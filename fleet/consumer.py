"""The thin consumer: what a Celery worker does with one message of an
agent's queue. It does no agent work itself: it claims the task, makes sure
the agent's container is up, forwards the job into it, records the masked
output and the outcome, handles credential failures (alert, circuit
breaker), and republishes the task when the outcome is a retry."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from docker.models.containers import Container

from fleet.alerts import CREDENTIAL_FAILURE, Alerts
from fleet.breaker import Breaker
from fleet.container.manager import ContainerManager
from fleet.dispatch import TASK_NAME
from fleet.errors import EngineError, FleetError, StaleTransition, TaskNotFound
from fleet.forward import ExitStatus, Forwarder, Job
from fleet.outcome import Outcome, classify, retry_or_fail
from fleet.output import OutputRecorder
from fleet.record import ErrorKind, State, TaskRecord, now_iso
from fleet.settings import AgentSpec, FleetSettings
from fleet.store import TaskStore
from fleet.tokens import TokenStore

log = logging.getLogger(__name__)

Republish = Callable[[str, str, int, float], None]


class AgentPaused(FleetError):
    """The agent's breaker is open: the message goes back to the queue."""


@dataclass
class Credentials:
    """What the consumer needs to handle tokens: the host's token store, the
    breaker, the alerts, and whether this process may take the agent's tasks."""

    tokens: TokenStore
    breaker: Breaker
    alerts: Alerts
    is_paused: Callable[[], bool]


class TaskRunner:
    def __init__(self, settings: FleetSettings, store: TaskStore, containers: ContainerManager,
                 forwarder: Forwarder, republish: Republish, credentials: Credentials) -> None:
        self.settings = settings
        self.store = store
        self.containers = containers
        self.forwarder = forwarder
        self.republish = republish
        self.credentials = credentials
        self.rng = random.Random()

    def run(self, task_id: str, attempt: int | None = None) -> None:
        try:
            record = self.store.get(task_id)
        except TaskNotFound:
            log.warning("task %s has no record (expired?); dropping its message", task_id)
            return
        if record.state.final:
            log.info("task %s is already %s; not running it again", task_id, record.state)
            return
        if attempt is not None and record.attempts >= attempt:
            log.info("task %s: attempt %d already started; dropping a stale message", task_id, attempt)
            return
        if self.credentials.is_paused():
            raise AgentPaused(f"agent {record.agent} is paused")
        spec = self.settings.agent(record.agent)
        try:
            with self.containers.use(record.agent) as container:
                started = self.start_attempt(task_id, container)
                if started is None:
                    return
                record = started
                seen = self.credentials.tokens.fingerprints(record.agent)
                output = OutputRecorder(self.store, task_id, self.settings.log_limit,
                                        self.credentials.tokens.values(record.agent))
                try:
                    status = self.forwarder.run(container, self.job(record, spec), output.write)
                finally:
                    output.close()
        except EngineError as error:
            self.engine_failed(task_id, error, spec)
            return
        outcome = classify(status, agent=record.agent, attempt=record.attempts, spec=spec,
                           last_stdout_line=output.last_line("stdout"),
                           last_stderr_line=output.last_line("stderr"), rng=self.rng)
        if outcome.error is not None and outcome.error.kind == ErrorKind.CREDENTIAL:
            outcome = self.credential_failed(record, outcome, seen, spec)
        elif outcome.state == State.SUCCEEDED:
            self.credentials.breaker.succeeded(record.agent)
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

    def credential_failed(self, record: TaskRecord, outcome: Outcome, seen: dict[str, str],
                          spec: AgentSpec) -> Outcome:
        """Record and alert; open the breaker after enough in a row; retry at
        once if the operator rotated the token while the attempt ran."""
        token = outcome.token or ""
        self.store.add_event(record.id, "credential_failure", token=token,
                             attempt=str(record.attempts))
        self.credentials.alerts.emit(
            CREDENTIAL_FAILURE, record.agent,
            f"task {record.id} attempt {record.attempts}: "
            f"{outcome.error.message if outcome.error else 'credential failure'}",
            task=record.id, token=token, host=self.settings.host)
        self.credentials.breaker.credential_failure(record.agent, token, spec.breaker_threshold)
        if outcome.state == State.RETRYING and self.credentials.tokens.fingerprints(record.agent) != seen:
            log.info("task %s: token rotated during the attempt; retrying at once", record.id)
            return Outcome(outcome.state, outcome.error, retry_in=0.0, token=outcome.token)
        return outcome

    def engine_failed(self, task_id: str, error: EngineError, spec: AgentSpec) -> None:
        """The container could not be made or the job not forwarded: an
        attempt that crashed, retried like a transient failure."""
        record = self.store.get(task_id)
        attempt = record.attempts if record.state == State.RUNNING else record.attempts + 1
        outcome = retry_or_fail(ErrorKind.CRASH, str(error), attempt=attempt, spec=spec, rng=self.rng)
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
            self.republish(record.id, record.agent, record.attempts + 1, outcome.retry_in)
        log.info("task %s attempt %d: %s", record.id, record.attempts, outcome.state)


def register_consumer(app: Celery, runner: TaskRunner) -> None:
    """Bind the task name the publisher sends to the runner."""

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def run(task_id: str, agent: str, attempt: int | None = None) -> None:
        try:
            runner.run(task_id, attempt)
        except AgentPaused as paused:
            # Back to the queue, untouched: no attempt is used up while paused.
            raise Reject(str(paused), requeue=True) from None
