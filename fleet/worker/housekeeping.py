"""The housekeeper: one thread per consumer process that keeps its running
tasks honest and notices what others left behind.

On every notice of the control channel, and at least every third of the
lease TTL, it:
  - ends tasks that were cancelled (a notice makes this immediate; the
    re-read catches a missed notice);
  - re-reads the agent's paused flag and its host's drain flag, and reports
    to the host registry how many tasks it runs and whether it consumes;
  - reaps: a `running` task of this agent whose lease expired was lost (its
    consumer died, or its host was cut off); it is recorded `lost` and
    published again (to its pinned host's queue if it has one). A `retrying`
    task long past its due time lost its delayed message with a dead
    consumer; it is published again (a duplicate is dropped by the attempt
    check). A `queued` task whose message has been in no queue and with no
    consumer for `lost_message_after_s` (lost with a failed-over Redis
    primary, a flushed queue) is published again, by one consumer;
  - watches consumption: a process that is idle, not paused, while its
    queue has messages has stopped consuming (celery#8030, #10205 after a
    Redis reconnect) and exits, so `fleet worker` restarts it.

A second thread keeps the leases: it renews those of the tasks this process
runs every third of the TTL (a lease it cannot renew was taken over: that
run is ended, and its writes are fenced off), and it fences this process
off: a run whose lease it has not renewed for 5/6 of the TTL (Redis
unreachable: a partition) is ended before the lease expires, so the attempt
another host takes over never overlaps it. Whatever that run still writes
carries its attempt and is refused."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from datetime import UTC, datetime

from fleet.broker.publish import Republish
from fleet.broker.queues import forget_purged, published_task_ids, purged_messages
from fleet.broker.routing import queue_name
from fleet.errors import FleetError, StaleTransition, TaskNotFound
from fleet.record import State, TaskRecord, task_id_problem
from fleet.state.control import ControlMessage, ControlSubscription, Notice, cancel
from fleet.state.hosts import HostRegistry
from fleet.state.listing import Filters
from fleet.state.store import TaskStore
from fleet.worker.holdback import ConsumptionControl
from fleet.worker.running import CANCELLED, LEASE_LOST, RunningTasks

log = logging.getLogger(__name__)

OVERDUE_RETRY_S = 60.0  # a retry this late lost its delayed message
STUCK_AFTER_S = 60.0  # idle this long with a non-empty queue: not consuming
EXIT_NOT_CONSUMING = 70
FENCE_AT = 5 / 6  # of the lease TTL without a renewal: end the run before the lease can expire


class Housekeeper:
    def __init__(self, store: TaskStore, registry: HostRegistry, agent: str, owner: str,
                 lease_ttl_s: float, running: RunningTasks, control: ConsumptionControl,
                 republish: Republish, queue_depth: Callable[[], int],
                 lost_message_after_s: float) -> None:
        self.store = store
        self.registry = registry
        self.agent = agent
        self.owner = owner
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.interval = lease_ttl_s / 3
        self.fence_after = lease_ttl_s * FENCE_AT
        # Looked at every 1/24 of the TTL; SIGTERM, then SIGKILL 1/24 later:
        # the run is over by 11/12 of the TTL, before the lease can expire.
        self.fence_poll = lease_ttl_s * (1 - FENCE_AT) / 4
        self.fence_grace = min(running.kill_grace_s, self.fence_poll)
        self.running = running
        self.control = control
        self.republish = republish
        self.queue_depth = queue_depth
        self.lost_message_after_s = lost_message_after_s
        self.next_lost_message_check = 0.0
        self.idle_since: float | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"housekeeper-{self.agent}", daemon=True).start()
        threading.Thread(target=self._lease_loop, name=f"leases-{self.agent}", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            subscription = None
            try:
                subscription = ControlSubscription(self.store.redis, self.store.keys)
                next_tick = 0.0
                while not self._stopped.is_set():
                    message = subscription.receive(timeout=max(0.0, next_tick - time.monotonic()))
                    if message is not None:
                        self.notice(message)
                    if time.monotonic() >= next_tick:
                        self.tick()
                        next_tick = time.monotonic() + self.interval
            except FleetError as error:
                log.warning("housekeeper for %s: %s; retrying", self.agent, error)
                self._stopped.wait(self.interval)
            except Exception:  # a broker error while republishing, a record it cannot read, …
                log.exception("housekeeper for %s failed; going on", self.agent)
                self._stopped.wait(self.interval)
            finally:
                if subscription is not None:
                    with suppress(FleetError):
                        subscription.close()

    def _lease_loop(self) -> None:
        """Leases on a thread of their own: a slow sweep never delays a renewal."""
        next_renewal = 0.0
        while not self._stopped.wait(self.fence_poll):
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + self.interval
                try:
                    self.keep_leases()
                except Exception as error:  # Redis away: the fence below decides
                    log.warning("renewing leases of %s: %s", self.agent, error)
            self.fence()

    def fence(self) -> None:
        now = time.monotonic()
        for task in self.running.all():
            if now - task.renewed_at > self.fence_after and task.reason is None:
                log.error("task %s: lease of attempt %d not renewed for %.1f s (Redis unreachable?); "
                          "ending this run before another consumer takes it over", task.job.task_id,
                          task.job.attempt, now - task.renewed_at)
                self.running.end(task.job.task_id, LEASE_LOST, grace_s=self.fence_grace)

    def notice(self, data: str) -> None:
        message = ControlMessage.parse(data)
        if message is None:
            log.warning("ignoring a control message fleet does not send: %.80r", data)
        elif message.notice == Notice.CANCEL:
            self.cancel(message.subject)
        elif message.notice == Notice.FREED:  # only a consumer held back looks again
            if message.subject == self.agent and not self.control.consuming:
                self.report(self.control.held_back())
        elif message.subject in (self.agent, self.control.host):
            self.report(self.control.held_back())

    def cancel(self, task_id: str) -> None:
        """End a run on a cancel notice only if the record says cancelled: a
        notice is a hint, anyone who may publish on the channel can send one."""
        if not any(task.job.task_id == task_id for task in self.running.all()):
            return
        try:
            cancelled = self.store.records.get(task_id).state == State.CANCELLED
        except FleetError as error:
            log.warning("cancel notice for task %s not checked (%s): not acted on", task_id, error)
            return
        if cancelled:
            self.running.end(task_id, CANCELLED)
        else:
            log.warning("ignoring a cancel notice for task %s: its record is not cancelled", task_id)

    def tick(self) -> None:
        held = self.control.held_back()
        self.report(held)
        self.reap()
        self.watch_consumption(held is not None)

    def report(self, held: str | None) -> None:
        self.registry.report(self.control.host, self.agent, self.running.in_flight,
                             consuming=held is None and self.control.consuming)

    def keep_leases(self) -> None:
        for task in self.running.all():
            job = task.job
            asked_at = time.monotonic()
            if self.store.leases.renew(job.task_id, self.agent, self.owner, job.attempt, self.ttl_ms,
                                       max_running=self.control.max_running):
                task.renewed_at = asked_at
            else:
                log.error("task %s: lease of attempt %d lost; ending this run", job.task_id,
                          job.attempt)
                self.running.end(job.task_id, LEASE_LOST, grace_s=0)
                continue
            if self.store.records.get(job.task_id).state == State.CANCELLED:
                self.running.end(job.task_id, CANCELLED)

    def cancel_purged(self) -> None:
        """Record `cancelled` the queued or retrying tasks whose messages
        `celery purge` took off this agent's queues (fleet.broker.transport),
        and forget those messages. Only a task whose message belongs in that
        queue (its agent, its pin) is cancelled; a purged duplicate of a
        running task's message leaves that run alone."""
        namespace = self.store.keys.namespace
        for queue in self.control.queues:
            for raw, task_id in purged_messages(self.store.redis, self.store.keys, queue):
                if task_id is not None and task_id_problem(task_id) is None:
                    with suppress(TaskNotFound):
                        record = self.store.records.get(task_id)
                        if (record.state in (State.QUEUED, State.RETRYING)
                                and queue_name(namespace, record.agent, record.pinned_host) == queue):
                            log.warning("task %s: its message was purged from %s; cancelling it",
                                        task_id, queue)
                            cancel(self.store, task_id, f"its message was purged from queue {queue}")
                forget_purged(self.store.redis, self.store.keys, queue, raw)

    def queue_due(self) -> None:
        """Queue the agent's scheduled tasks whose time has come. Moving the
        record to `queued` is the claim (one consumer wins it); the message
        follows. A consumer that dies in between leaves a queued task with no
        message, which the lost-message sweep below publishes. The index is
        anyone's who may submit: an entry that is not this agent's scheduled
        task, or whose record says it is not due yet, is dropped or put back."""
        now = time.time()
        for task_id in self.store.records.due(self.agent, now):
            try:
                record = (self.store.records.get(task_id) if task_id_problem(task_id) is None else None)
                if record is None or record.agent != self.agent or record.state != State.SCHEDULED:
                    self.store.records.unschedule(self.agent, task_id)
                    continue
                run_at = datetime.fromisoformat(record.run_at).timestamp() if record.run_at else now
                if run_at > now:  # the score was lowered: the record's time holds
                    self.store.records.reschedule(self.agent, task_id, run_at)
                    continue
                queued = self.store.records.transition(task_id, State.QUEUED, current=record,
                                                       require=State.SCHEDULED)
            except (StaleTransition, TaskNotFound):  # queued by another consumer, cancelled, expired
                self.store.records.unschedule(self.agent, task_id)
                continue
            except (ValueError, TypeError) as error:  # a run_at nobody could have meant
                log.warning("task %s: dropped from the schedule: %s", task_id, error)
                self.store.records.unschedule(self.agent, task_id)
                continue
            self.store.records.unschedule(self.agent, task_id)
            log.info("task %s: its time has come; queued", task_id)
            self.republish(queued, queued.attempts + 1, 0.0)

    def reap(self) -> None:
        try:  # before the sweep below could take those tasks' messages for lost
            self.cancel_purged()
        except Exception as error:  # whatever is in those lists, the reaping below goes on
            log.error("agent %s: purged messages not dealt with: %s", self.agent, error)
        try:
            self.queue_due()
        except Exception as error:  # whatever is in the schedule, the reaping below goes on
            log.error("agent %s: scheduled tasks not dealt with: %s", self.agent, error)
        for record in self.store.listing.find(Filters(agent=self.agent, state=State.RUNNING)):
            if self.store.leases.owner(record.id) is None and self.store.leases.reclaim(record.id):
                log.warning("task %s: attempt %d was lost (lease expired); publishing it again",
                            record.id, record.attempts)
                self.republish(record, record.attempts + 1, 0.0)
        now = time.time()
        self.republish_overdue_retries(now)
        if time.monotonic() >= self.next_lost_message_check:
            self.next_lost_message_check = time.monotonic() + self.lost_message_after_s / 2
            self.republish_lost_messages(now)

    def queues_of(self, records: Iterable[TaskRecord]) -> list[str]:
        """The queues these tasks' messages go to (shared, or pinned to a host)."""
        return sorted({queue_name(self.store.keys.namespace, self.agent, r.pinned_host) for r in records})

    def republish_overdue_retries(self, now: float) -> None:
        """A `retrying` task long past its due time lost its delayed message
        with a dead consumer: publish it again — unless its message waits in
        a queue (put back while the agent was at its max_running)."""
        overdue = []
        for record in self.store.listing.find(Filters(agent=self.agent, state=State.RETRYING)):
            due = datetime.fromisoformat(record.retry_at).timestamp() if record.retry_at else now
            if now - due > OVERDUE_RETRY_S:
                overdue.append((record, due))
        if not overdue:
            return
        waiting = published_task_ids(self.store.redis, self.store.keys, self.queues_of(r for r, _ in overdue),
                                     delivered_after=math.inf)
        for record, due in overdue:
            if record.id in waiting:
                continue
            log.warning("task %s: retry overdue by %.0f s; publishing it again", record.id, now - due)
            self.republish(record, record.attempts + 1, 0.0)
            self.store.records.transition(record.id, State.RETRYING, epoch=record.attempts,
                                          retry_at=datetime.fromtimestamp(now, UTC).isoformat())

    def republish_lost_messages(self, now: float) -> None:
        waiting = self.store.records.queued_before(self.agent, now - self.lost_message_after_s)
        if not waiting:
            return
        published = published_task_ids(self.store.redis, self.store.keys, self.queues_of(waiting),
                                       delivered_after=now - self.lost_message_after_s)
        for record in waiting:
            if record.id in published or not self.store.records.take_republish_turn(
                    record.id, self.lost_message_after_s):
                continue
            if self.store.records.get(record.id).state != State.QUEUED:  # it ran meanwhile
                continue
            log.warning("task %s: queued for over %.0f s and its message is in no queue and with no "
                        "live consumer: publishing it again", record.id, self.lost_message_after_s)
            self.store.events.add(record.id, "message_republished", reason="lost")
            self.republish(record, record.attempts + 1, 0.0)

    def watch_consumption(self, held: bool) -> None:
        if held or self.running.in_flight or self.queue_depth() == 0:
            self.idle_since = None
            return
        self.idle_since = self.idle_since or time.monotonic()
        if time.monotonic() - self.idle_since > STUCK_AFTER_S:
            log.error("agent %s: idle for %.0f s while its queues have tasks: this consumer stopped "
                      "consuming; exiting so that fleet worker restarts it", self.agent, STUCK_AFTER_S)
            os._exit(EXIT_NOT_CONSUMING)
