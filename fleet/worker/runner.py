"""The thin consumer: what a Celery worker does with one message of an
agent's queue. It does no agent work itself: it claims the task under a
lease, makes sure the agent's container is up, forwards the job into it,
records the masked output and the outcome (fenced by the attempt), handles
credential failures (alert, circuit breaker), and republishes the task when
the outcome is a retry."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Celery
from celery.exceptions import Reject
from docker.models.containers import Container

from fleet.broker.celery_app import TASK_NAME
from fleet.broker.publish import Republish
from fleet.container.engine import engine_errors
from fleet.container.manager import ContainerManager
from fleet.credentials.alerts import CREDENTIAL_FAILURE, Alerts
from fleet.credentials.breaker import Breaker
from fleet.credentials.tokens import TokenStore, fingerprints_of, present
from fleet.errors import EngineError, FleetError, LeaseHeld, StaleTransition, StateStoreError, TaskNotFound
from fleet.forwarding.base import ExitStatus, Forwarder, Job
from fleet.record import ErrorKind, State, TaskError, TaskRecord, now_iso
from fleet.settings import AgentSpec, FleetSettings
from fleet.state.store import TaskStore
from fleet.worker.outcome import Outcome, classify, retry_or_fail
from fleet.worker.output import OutputRecorder
from fleet.worker.running import HANDBACK, TIMEOUT, RunningTask, RunningTasks

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTCOME_PATIENCE_S = 600.0  # how long a finished attempt's outcome waits for Redis


class HeldBack(FleetError):
    """The agent is paused or the host drained: the message goes back to the queue."""


@dataclass
class Credentials:
    """What the consumer needs to handle tokens: the host's token store, the
    breaker and the alerts."""

    tokens: TokenStore
    breaker: Breaker
    alerts: Alerts


@dataclass
class Attempt:
    """What one run of a task left: its exit status, why fleet ended it (if
    it did), whether the container died under it, and its output."""

    record: TaskRecord
    status: ExitStatus
    running: RunningTask
    output: OutputRecorder
    container_died: bool
    tokens_seen: dict[str, str]


class TaskRunner:
    def __init__(self, settings: FleetSettings, store: TaskStore, containers: ContainerManager,
                 forwarder: Forwarder, running: RunningTasks, republish: Republish,
                 credentials: Credentials, held_back: Callable[[], str | None], owner: str) -> None:
        self.settings = settings
        self.store = store
        self.containers = containers
        self.forwarder = forwarder
        self.running = running
        self.republish = republish
        self.credentials = credentials
        self.held_back = held_back  # why this consumer may not take tasks now, or None
        self.owner = owner
        self.rng = random.Random()

    def run(self, task_id: str, attempt: int | None = None) -> None:
        with self.running.handling():
            self.handle(task_id, attempt)

    def handle(self, task_id: str, attempt: int | None) -> None:
        try:
            record, payload = self.store.records.get_with_payload(task_id)
        except TaskNotFound:
            log.warning("task %s has no record (expired?); dropping its message", task_id)
            return
        if record.state.final:
            log.info("task %s is already %s; not running it again", task_id, record.state)
            return
        if (reason := self.held_back()) is not None:
            raise HeldBack(reason)
        spec = self.settings.agent(record.agent)
        try:
            with self.containers.use(record.agent, self.forwarder.connected) as container:
                try:
                    leased_at = time.monotonic()  # the lease runs from before the claim
                    record = self.store.leases.claim(
                        record, attempt, self.owner, int(self.settings.lease_ttl_s * 1000),
                        host=self.settings.host, container=container.short_id)
                except (StaleTransition, LeaseHeld) as refused:
                    log.info("not running task %s: %s", task_id, refused)
                    return
                done = self.attempt(record, payload, spec, container, leased_at)
        except EngineError as error:
            self.containers.invalidate(record.agent)
            self.engine_failed(task_id, error, spec)
            return
        if done.container_died:
            self.containers.invalidate(record.agent)
        # Each step waits for Redis on its own, so a retried step does not
        # repeat the side effects (alerts, breaker counts) of the one before.
        self.until_stored(done.record, done.output.flush)
        decided = self.until_stored(done.record, lambda: self.decide_outcome(done, spec))
        if decided is not None:
            self.until_stored(done.record, lambda: self.finish(done.record, decided, done.status))

    def until_stored(self, record: TaskRecord, write: Callable[[], T]) -> T | None:
        """Write an attempt's outcome, waiting for Redis while it is away; what
        `write` returned, or None if it never got through. A write refused as
        stale (the task was taken over) is logged, not retried."""
        deadline, delay = time.monotonic() + OUTCOME_PATIENCE_S, 0.5
        while True:
            try:
                return write()
            except StaleTransition as refused:
                log.warning("task %s: late write of attempt %d refused: %s", record.id,
                            record.attempts, refused)
                return None
            except (StateStoreError, redis.RedisError) as error:
                if time.monotonic() > deadline:
                    log.error("task %s: outcome of attempt %d not recorded, Redis away for %.0f s "
                              "(%s); its lease has expired and it will run again", record.id,
                              record.attempts, OUTCOME_PATIENCE_S, error)
                    return None
                log.warning("task %s: outcome of attempt %d waits for Redis: %s", record.id,
                            record.attempts, error)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def attempt(self, record: TaskRecord, payload: dict[str, Any], spec: AgentSpec,
                container: Container, leased_at: float) -> Attempt:
        job = Job(task_id=record.id, agent=record.agent, attempt=record.attempts,
                  payload=json.dumps(payload).encode(),
                  command=list(spec.command), user=str(self.settings.agent_uid))
        # A previous attempt may still run here if its consumer died: end it
        # first, so two runs of one task never overlap.
        if record.attempts > 1 and (ended := self.forwarder.kill(container, job,
                                                                 self.settings.kill_grace_s)):
            self.store.events.add(record.id, "previous_attempt_ended", epoch=record.attempts,
                                 processes=str(ended))
        tokens = self.credentials.tokens.read_all(record.agent)  # each file read once per task
        tokens_seen = fingerprints_of(tokens)
        output = OutputRecorder(self.store.events, record.id, record.attempts, self.settings.log_limit,
                                present(tokens))
        running = self.running.add(job, container, timeout_s=spec.timeout_s, renewed_at=leased_at)
        try:
            status = self.forwarder.run(container, job, output.write)
        finally:
            output.close()
            self.running.remove(record.id)
        died = False
        if not 0 <= status.code < 128:  # killed by a signal: was it the whole container?
            with engine_errors(f"inspecting container {container.name}"):
                container.reload()
            died = container.status != "running"
        # Nothing the task started keeps running after it, nor any orphan.
        live = [task.job.task_id for task in self.running.all()]
        leftovers = status.leftovers + (0 if died else self.forwarder.kill(container, job, 0, sweep=live))
        if leftovers:
            self.until_stored(record, lambda: self.store.events.add(
                record.id, "leftover_processes_killed", epoch=record.attempts, processes=str(leftovers)))
        return Attempt(record, status, running, output, died, tokens_seen)

    def decide_outcome(self, done: Attempt, spec: AgentSpec) -> Outcome | None:
        """What the attempt comes to, with its side effects (events, alerts,
        the breaker); None if there is nothing to record (cancelled, taken over)."""
        record, reason = done.record, done.running.reason
        if reason == HANDBACK:
            error = TaskError(kind=ErrorKind.LOST, message="handed back at worker shutdown")
            outcome = Outcome(State.RETRYING, error=error, retry_in=0.0)
        elif reason is not None and reason != TIMEOUT:
            # Cancelled (already recorded) or taken over (our writes are fenced off).
            log.info("task %s attempt %d ended: %s", record.id, record.attempts, reason)
            self.store.events.add(record.id, "attempt_ended", epoch=record.attempts, reason=reason,
                                 attempt=str(record.attempts))
            return None
        elif done.container_died:
            outcome = retry_or_fail(ErrorKind.CRASH, f"the container died under attempt "
                                    f"{record.attempts} (exit status {done.status.code})",
                                    attempt=record.attempts, spec=spec, rng=self.rng)
        else:
            status = ExitStatus(done.status.code, timed_out=reason == TIMEOUT)
            outcome = classify(status, agent=record.agent, attempt=record.attempts, spec=spec,
                               last_stdout_line=done.output.last_line("stdout"),
                               last_stderr_line=done.output.last_line("stderr"), rng=self.rng)
            if outcome.error is not None and outcome.error.kind == ErrorKind.CREDENTIAL:
                outcome = self.credential_failed(record, outcome, done.tokens_seen, spec)
            elif outcome.state == State.SUCCEEDED:
                self.credentials.breaker.succeeded(record.agent)
        return outcome

    def credential_failed(self, record: TaskRecord, outcome: Outcome, seen: dict[str, str],
                          spec: AgentSpec) -> Outcome:
        """Record and alert; open the breaker after enough in a row; retry at
        once if the operator rotated the token while the attempt ran."""
        token = outcome.token or ""
        self.store.events.add(record.id, "credential_failure", epoch=record.attempts, token=token,
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
        record = self.store.records.get(task_id)
        if record.state.final:
            return
        started = record.state == State.RUNNING
        attempt = record.attempts if started else record.attempts + 1
        outcome = retry_or_fail(ErrorKind.CRASH, str(error), attempt=attempt, spec=spec, rng=self.rng)
        log.warning("task %s attempt %d crashed: %s", task_id, attempt, error)
        self.finish(record.model_copy(update={"attempts": attempt}), outcome, None,
                    epoch=record.attempts)

    def finish(self, record: TaskRecord, outcome: Outcome, status: ExitStatus | None,
               epoch: int | None = None) -> None:
        fields: dict[str, Any] = {
            "exit_code": None if status is None else status.code,
            "error": outcome.error,
            "attempts": record.attempts,
        }
        if outcome.state.final:
            fields.update(result=outcome.result, finished_at=now_iso())
        elif outcome.retry_in is not None:
            fields.update(retry_at=now_iso(later_s=outcome.retry_in))
        try:
            # An attempt's own outcome applies only while it runs: not once
            # it was declared lost (`retrying`) or cancelled.
            self.store.records.transition(record.id, outcome.state,
                                  epoch=record.attempts if epoch is None else epoch,
                                  current=record if epoch is None else None,
                                  require=State.RUNNING if epoch is None else None, **fields)
        except StaleTransition as refused:  # cancelled while it ran, or taken over
            log.warning("task %s: outcome of attempt %d refused: %s", record.id, record.attempts,
                        refused)
            return
        if outcome.state == State.RETRYING and outcome.retry_in is not None:
            self.store.events.add(record.id, "retry", delay=f"{outcome.retry_in:.3f}")
            self.republish(record, record.attempts + 1, outcome.retry_in)
        log.info("task %s attempt %d: %s", record.id, record.attempts, outcome.state)


def register_consumer(app: Celery, runner: TaskRunner) -> None:
    """Bind the task name the publisher sends to the runner."""

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def run(task_id: str, agent: str, attempt: int | None = None) -> None:
        try:
            runner.run(task_id, attempt)
        except HeldBack as held:
            # Back to the queue, untouched: no attempt is used up while held back.
            raise Reject(str(held), requeue=True) from None
