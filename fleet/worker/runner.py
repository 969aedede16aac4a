"""The task runner: what a consumer does with one message of an agent's
queue. It does no agent work itself: it claims the task under a lease, makes
sure the agent's container is up, forwards the job into it and records the
masked output (fenced by the attempt); then it gathers what the attempt left,
lets `decision.decide` say what that comes to, and has `effects` record it."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from docker.models.containers import Container

from fleet.broker.celery_app import TASK_NAME
from fleet.broker.message import Malformed, NewTask, RunTask, read_message
from fleet.broker.publish import Republish
from fleet.container.engine import engine_errors
from fleet.container.manager import ContainerManager
from fleet.credentials.signing import KeyFile
from fleet.credentials.tokens import TokenWatch, fingerprints_of, present
from fleet.errors import (
    EngineError,
    FleetError,
    LeaseHeld,
    SlotsTaken,
    StaleTransition,
    StateStoreError,
    TaskNotFound,
)
from fleet.forwarding.base import ChannelBroken, ExitStatus, Forwarder, Job
from fleet.record import State, TaskRecord, payload_problem, task_id_problem
from fleet.settings import AgentSpec, FleetSettings
from fleet.state.control import Notice, announce
from fleet.state.records import new_task_id
from fleet.state.store import TaskStore
from fleet.worker.decision import AttemptFacts, decide, engine_failure, rejection
from fleet.worker.effects import Credentials, Effects, until_stored
from fleet.worker.logs import about_task, attempt_known
from fleet.worker.outcome import EXIT_CREDENTIAL
from fleet.worker.output import OutputRecorder
from fleet.worker.running import RunningTask, RunningTasks

log = logging.getLogger(__name__)

class HeldBack(FleetError):
    """The agent is paused, the host drained or the agent's max_running
    reached: the message goes back to the queue."""


@dataclass
class Attempt:
    """What one run of a task left: its exit status, why fleet ended it (if
    it did), why the container was lost under it (if it was), and its output."""

    record: TaskRecord
    status: ExitStatus
    running: RunningTask
    output: OutputRecorder
    container_lost: str | None
    tokens_seen: dict[str, str]


# No longer trust a container (and kill it): (the container, why).
Condemn = Callable[[Container, str], None]


class TaskRunner:
    def __init__(self, settings: FleetSettings, store: TaskStore, containers: ContainerManager,
                 forwarder: Forwarder, running: RunningTasks, republish: Republish,
                 credentials: Credentials, held_back: Callable[[], str | None], owner: str,
                 condemn: Condemn, user: str, agent: str) -> None:
        self.settings = settings
        self.agent = agent  # the one this consumer serves
        self.signing_keys = KeyFile(settings.signing_key_file) if settings.signing_key_file else None
        self.store = store
        self.containers = containers
        self.forwarder = forwarder
        self.running = running
        self.republish = republish
        self.credentials = credentials
        self.effects = Effects(store, credentials, republish)
        self.held_back = held_back  # why this consumer may not take tasks now, or None
        self.owner = owner
        self.condemn = condemn
        self.user = user  # the agent's own uid on this host
        self.rng = random.Random()

    def run_message(self, message_id: Any, args: Sequence[Any],
                    kwargs: Mapping[str, Any]) -> TaskRecord | None:
        """Handle one message of the agent's queue (fleet.broker.message);
        the task's record afterwards, or None if it names no task of its own."""
        with self.running.handling(), about_task(str(message_id), None):
            match read_message(message_id, args, kwargs):
                case RunTask(task_id, attempt):
                    written = self.handle(task_id, attempt)
                case NewTask() as new:
                    if (adopted := self.adopt(new)) is None:
                        return None
                    task_id = adopted.id
                    written = self.handle(task_id, None)
                case Malformed() as malformed:
                    return self.reject_malformed(malformed)
            if written is not None and written.state not in (State.QUEUED, State.RUNNING):
                return written
            try:  # another writer's, or none at all (or ours went stale: cancelled meanwhile, say)
                return self.store.records.get(task_id)
            except TaskNotFound:
                return None

    def adopt(self, new: NewTask) -> TaskRecord | None:
        """The record of a publisher's task, written from its message (or the
        one a redelivery of it finds); None if its id is another task's."""
        if new.agent not in self.settings.agents:
            return self.reject_malformed(Malformed(new.task_id, f"unknown agent {new.agent!r:.80}"))
        if (problem := payload_problem(new.payload, self.settings.payload_limit)) is not None:
            return self.reject_malformed(Malformed(new.task_id, problem))  # never stored
        record, created = self.store.records.adopt(new.task_id, new.agent, new.payload, new.created_at,
                                                   new.signed_by, new.signature)
        if record is None:
            log.warning("a publisher's message for task %s not run: a task of that id has finished",
                        new.task_id)
            return None
        if created:
            self.store.events.add(record.id, "published", by="celery", queue_agent=self.agent)
            return record
        stored = self.store.records.get_with_payload(record.id)[1]
        if record.agent != new.agent or stored != new.payload:
            log.warning("a publisher's message for task %s not run: that id is another task's", new.task_id)
            return None
        return record  # a redelivery: its record decides

    def reject_unreadable(self, message_id: Any, why: str) -> None:
        """A message Celery itself could not read (fleet.worker.celery_consumer)."""
        fit = isinstance(message_id, str) and task_id_problem(message_id) is None
        self.reject_malformed(Malformed(message_id if fit else None, why))

    def reject_malformed(self, malformed: Malformed) -> TaskRecord | None:
        """A message fleet cannot run is recorded `rejected` with why, under its
        id (or a new one if it has none fit), never dropped unseen; an id
        another task has is left alone."""
        task_id = malformed.task_id or new_task_id()
        record, created = self.store.records.adopt(task_id, self.agent, {})
        if record is None or not created:
            log.warning("a malformed message for task %s not recorded (that task exists): %s", task_id,
                        malformed.reason)
            return None
        log.warning("message for task %s rejected: %s", task_id, malformed.reason)
        return self.effects.apply(record, rejection(record.id, record.agent, self.settings.host, 0,
                                                    f"malformed message: {malformed.reason}", State.QUEUED))

    def handle(self, task_id: str, attempt: int | None) -> TaskRecord | None:
        """Run (or refuse) one task of a message; the record as this consumer
        last wrote or read it, or None where another writer decides it."""
        try:  # task_id is fit to be a key (read_message checked it): no other key is read for one
            record, payload = self.store.records.get_with_payload(task_id)
        except TaskNotFound:
            log.warning("task %s has no record (expired?); dropping its message", task_id)
            return None
        if record.state.final:
            log.info("task %s is already %s; not running it again", task_id, record.state)
            return record
        if (reason := self.held_back()) is not None:
            raise HeldBack(reason)
        if (why := self.refusal(record, payload)) is not None:
            if record.state not in (State.QUEUED, State.RETRYING):  # another consumer's run: not ours to end
                log.warning("dropping a message for task %s (%s): %s", task_id, record.state, why)
                return None
            log.warning("task %s rejected: %s", task_id, why)
            return self.effects.apply(record, rejection(record.id, record.agent, self.settings.host,
                                                        record.attempts, why, record.state))
        spec = self.settings.agent(record.agent)
        held: Container | None = None
        claimed = False
        try:
            try:
                with self.containers.use(record.agent, self.forwarder.connected) as container:
                    held = container
                    try:
                        leased_at = time.monotonic()  # the lease runs from before the claim
                        record = self.store.leases.claim(
                            record, attempt, self.owner, int(self.settings.lease_ttl_s * 1000),
                            spec.max_running, host=self.settings.host, container=container.short_id)
                    except SlotsTaken as full:
                        self.held_back()  # stops consuming until a slot is free
                        raise HeldBack(str(full)) from None
                    except (StaleTransition, LeaseHeld) as refused:
                        log.info("not running task %s: %s", task_id, refused)
                        return None
                    claimed = True
                    attempt_known(record.attempts)
                    done = self.attempt(record, payload, spec, container, leased_at)
            except EngineError as error:
                if isinstance(error, ChannelBroken) and held is not None:
                    self.condemn(held, str(error))
                self.containers.invalidate(record.agent)
                self.engine_failed(task_id, error, spec)
                return None
            if done.container_lost is not None:
                self.containers.invalidate(record.agent)
            until_stored(done.record, done.output.flush)
            facts = self.facts(done)
            decision = decide(facts, spec, self.rng)
            if decision.outcome is None:
                log.info("task %s attempt %d ended: %s", record.id, record.attempts, facts.reason)
            written = self.effects.apply(done.record, decision)
            return written if decision.outcome is not None else None
        finally:
            if claimed and spec.max_running is not None:  # its end has freed its slot
                self.slot_freed()

    def slot_freed(self) -> None:
        """Tell the agent's consumers held back at max_running (on every
        host) that a slot may be free: they look at once."""
        try:
            announce(self.store.redis, self.store.keys, Notice.FREED, self.agent)
        except FleetError as error:  # they look again within a third of the lease anyway
            log.info("could not announce a free slot of %s: %s", self.agent, error)

    def refusal(self, record: TaskRecord, payload: Any) -> str | None:
        """Why this consumer must not run the task at all (None: it may). It
        runs only what it was configured for, whoever wrote the record."""
        host = self.settings.host
        if record.agent != self.agent:
            return f"it is for agent {record.agent!r} and this consumer serves {self.agent!r}"
        if not self.settings.agent(record.agent).serves(host):
            return f"agent {record.agent!r} may not run on host {host!r}"
        if record.pinned_host is not None and record.pinned_host != host:
            return f"it is pinned to host {record.pinned_host!r}"
        if (problem := payload_problem(payload, self.settings.payload_limit)) is not None:
            return problem
        if self.signing_keys is None:
            return None
        try:
            keys = self.signing_keys.current()
        except FleetError as error:
            return f"its signature cannot be checked: {error}"
        refused = keys.refusal(record.id, record.agent, record.pinned_host, payload, record.created_at,
                               record.signed_by, record.signature)
        if refused is None and self.store.records.finished_before(record.id):
            return "it ran to its end already: its record was put back afterwards (a replay)"
        if refused is None:
            return signature_age_problem(record.created_at, self.settings.retention_s)
        return refused

    def attempt(self, record: TaskRecord, payload: dict[str, Any], spec: AgentSpec,
                container: Container, leased_at: float) -> Attempt:
        job = Job(task_id=record.id, agent=record.agent, attempt=record.attempts,
                  payload=json.dumps(payload).encode(), command=list(spec.command), user=self.user,
                  network_environment=self.containers.network_environment(record.agent, record.id,
                                                                          record.attempts))
        # A previous attempt may still run here if its consumer died: end it
        # first, so two runs of one task never overlap.
        if record.attempts > 1 and (ended := self.forwarder.kill(container, job,
                                                                 self.settings.kill_grace_s)):
            self.store.events.add(record.id, "previous_attempt_ended", epoch=record.attempts,
                                 processes=str(ended))
        watch = TokenWatch(self.credentials.tokens, record.agent)  # before the read: no rotation missed
        tokens = self.credentials.tokens.read_all(record.agent)  # each file read once per task
        tokens_seen = fingerprints_of(tokens)
        output = OutputRecorder(self.store.events, record.id, record.attempts, self.settings.log_limit,
                                present(tokens), rotated=watch.rotated)
        running = self.running.add(job, container, timeout_s=spec.timeout_s, renewed_at=leased_at)
        lost: str | None = None
        try:
            status = self.forwarder.run(container, job, output.write)
        except ChannelBroken as broken:
            self.condemn(container, str(broken))
            status, lost = ExitStatus(code=-1), str(broken)
        finally:
            output.close()
            self.running.remove(record.id)
        if lost is None and not 0 <= status.code < 128:  # killed by a signal: was it the whole container?
            with engine_errors(f"inspecting container {container.name}"):
                container.reload()
            if container.status != "running":
                lost = f"it died (exit status {status.code})"
        if lost is not None:
            return Attempt(record, status, running, output, lost, tokens_seen)
        # Nothing the task started keeps running after it, nor any orphan.
        live = [task.job.task_id for task in self.running.all()]
        leftovers = status.leftovers + self.forwarder.kill(container, job, 0, sweep=live)
        if leftovers:
            until_stored(record, lambda: self.store.events.add(
                record.id, "leftover_processes_killed", epoch=record.attempts, processes=str(leftovers)))
        return Attempt(record, status, running, output, None, tokens_seen)

    def facts(self, done: Attempt) -> AttemptFacts:
        """What the attempt left, with whether a token was rotated while it
        ran — which only a credential failure asks, so only then are the
        token files read again."""
        record = done.record
        rotated = (done.status.code == EXIT_CREDENTIAL
                   and self.credentials.tokens.fingerprints(record.agent) != done.tokens_seen)
        return AttemptFacts(
            task_id=record.id, agent=record.agent, host=self.settings.host, attempt=record.attempts,
            exit_code=done.status.code, reason=done.running.reason,
            container_lost=done.container_lost,
            last_stdout_line=done.output.last_line("stdout"),
            last_stderr_line=done.output.last_line("stderr"), token_rotated=rotated)

    def engine_failed(self, task_id: str, error: EngineError, spec: AgentSpec) -> None:
        """The container could not be made or the job not forwarded: an
        attempt that crashed, retried like a transient failure."""
        record = self.store.records.get(task_id)
        if record.state.final:
            return
        attempt = record.attempts if record.state == State.RUNNING else record.attempts + 1
        log.warning("task %s attempt %d crashed: %s", task_id, attempt, error)
        self.effects.apply(record, engine_failure(task_id, attempt, record.attempts, str(error),
                                                  spec, self.rng))


CLOCK_SKEW_S = 300  # how far ahead of this host's clock a signer's may be


def signature_age_problem(created_at: str, retention_s: int) -> str | None:
    """Why a signed task's creation time is not acceptable (None: it is).
    Older than a finished task's marker is kept, a replay could no longer be
    told; a time in the future would stretch that window."""
    from datetime import UTC, datetime

    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(created_at)).total_seconds()
    except (ValueError, TypeError):  # not ISO 8601, or without a zone
        return f"its created_at {created_at!r:.60} is not an ISO 8601 time with a zone"
    if age > retention_s:
        return f"it was signed more than retention_s={retention_s} s ago"
    if age < -CLOCK_SKEW_S:
        return f"it was signed {-age:.0f} s in the future (created_at {created_at!r:.60})"
    return None


def register_consumer(app: Celery, runner: TaskRunner) -> None:
    """Bind the task name the publisher sends to the runner; what Celery
    reports of each message (its events, for Flower) mirrors fleet's record."""
    from celery import Task
    from celery.exceptions import Ignore

    from fleet.errors import TaskFailed
    from fleet.worker.celery_outcome import report_outcome

    @app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True, throws=(TaskFailed,))
    def run(task: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            record = runner.run_message(task.request.id, args, kwargs)
        except HeldBack as held:
            # Back to the queue, untouched: no attempt is used up while held back.
            raise Reject(str(held), requeue=True) from None
        except StateStoreError as error:
            # Redis went away before the attempt was recorded (an outcome
            # waits for Redis on its own): the message goes back, not lost.
            raise Reject(f"Redis: {error}", requeue=True) from None
        if record is None:
            raise Ignore()
        return report_outcome(task, record)
