"""FleetClient: the orchestrator's side (the publisher process). It writes
the task record and publishes by task name; it never imports consumer code,
and imports Celery only when it first publishes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis

from fleet.broker.queues import waiting_messages
from fleet.broker.routing import queue_name
from fleet.connection import connect_redis
from fleet.credentials.alerts import Alerts
from fleet.credentials.breaker import Breaker
from fleet.credentials.signing import SigningKeys
from fleet.errors import StateStoreError, UsageError
from fleet.record import ErrorKind, State, TaskError, TaskRecord, now_iso, payload_problem, priority_value
from fleet.settings import FleetSettings, load_settings
from fleet.state.completion import Completion
from fleet.state.control import cancel
from fleet.state.hosts import HostRegistry, HostStatus
from fleet.state.listing import BadCursor, Filters, Page
from fleet.state.store import TaskStore

if TYPE_CHECKING:
    from celery import Celery

MAX_SCHEDULE_S = 366 * 86400  # how far ahead a task may be scheduled
BULK_LIMIT = 1_000_000  # what a bulk operation reads at most: every task a fleet keeps


def scheduled_time(eta: datetime | None, countdown: float | None) -> float | None:
    """When a task is due (epoch seconds), None for at once."""
    if eta is not None and countdown is not None:
        raise UsageError("give eta or countdown, not both")
    now = time.time()
    if eta is not None:
        if eta.tzinfo is None:
            raise UsageError(f"eta {eta.isoformat()} has no time zone (e.g. {eta.isoformat()}+00:00)")
        at = eta.timestamp()
    elif countdown is not None:
        if countdown < 0:
            raise UsageError(f"countdown must not be negative, not {countdown:g}")
        at = now + countdown
    else:
        return None
    if at - now > MAX_SCHEDULE_S:
        raise UsageError(f"a task may be scheduled at most {MAX_SCHEDULE_S // 86400} days ahead")
    return at if at > now else None


class FleetClient:
    def __init__(self, settings: FleetSettings, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.store = TaskStore(redis_client or connect_redis(settings),
                               settings.namespace, settings.retention_s, settings.on_done_hooks)
        self.alerts = Alerts(self.store.redis, self.store.keys, settings.alert_command)
        self.breaker = Breaker(self.store.redis, self.store.keys, self.alerts)
        self.hosts = HostRegistry(self.store.redis, self.store.keys, settings.heartbeat_s)

    @cached_property
    def app(self) -> Celery:
        """The Celery app, made (and Celery imported) on first publish."""
        from fleet.broker.celery_app import make_celery

        return make_celery(self.settings)

    @cached_property
    def signing_keys(self) -> SigningKeys | None:
        """The keys submissions are signed with (the first), if signing is configured."""
        path = self.settings.signing_key_file
        return SigningKeys.load(path) if path is not None else None

    @classmethod
    def from_settings(cls, **overrides: Any) -> FleetClient:
        return cls(load_settings(**overrides))

    def check_payload(self, payload: Any) -> None:
        if (problem := payload_problem(payload, self.settings.payload_limit)) is not None:
            raise UsageError(problem)

    def check_host(self, agent: str, host: str) -> None:
        """A task may be pinned only to a registered host that serves its agent."""
        self.settings.check_serves(agent, host)
        served = self.hosts.get(host).registration.agents
        if agent not in served:
            raise UsageError(f"host {host!r} does not serve agent {agent!r} "
                             f"(it serves: {', '.join(served)})")

    def submit(self, agent: str, payload: dict[str, Any], key: str | None = None,
               host: str | None = None, eta: datetime | None = None,
               countdown: float | None = None, priority: int | str | None = None,
               on_done: list[str] | None = None) -> str:
        """Queue a task for `agent`; returns its id. With `host`, the task
        runs only on that host (its pinned queue there), retries included. A
        key already used returns that task's id and publishes nothing. With
        `eta` (a zoned datetime) or `countdown` (seconds) it is `scheduled`
        until then: a consumer of the agent queues it when its time has come
        (within a third of `lease_ttl_s`); it can be cancelled meanwhile.
        `priority` ("high", "normal", "low" or 0-9, 0 first) orders it within
        its agent's queue, retries included. `on_done` names hooks (of the
        settings' `on_done`) told when it ends, besides its agent's."""
        self.settings.agent(agent)
        if len(on_done or []) > 16:
            raise UsageError("a task names at most 16 on_done hooks")
        if unknown := [name for name in on_done or [] if name not in self.settings.on_done]:
            raise UsageError(f"no on_done hook {unknown[0]!r} is configured "
                             f"(configured: {', '.join(self.settings.on_done) or 'none'})")
        self.check_payload(payload)
        try:
            rank = priority_value(priority)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if host is not None:
            self.check_host(agent, host)
        run_at = scheduled_time(eta, countdown)
        signer = self.signing_keys.sign if self.signing_keys else None
        ahead = 0.0 if run_at is None else run_at - time.time()
        if signer is not None and ahead > self.settings.retention_s - 300:
            raise UsageError(f"with signing, a task may be scheduled at most retention_s="
                             f"{self.settings.retention_s} s ahead (less 300 s): a signature older "
                             "than that is refused")
        task_id, created = self.store.records.create(agent, payload, key, pinned_host=host, signer=signer,
                                                     run_at=run_at, priority=rank, on_done=on_done)
        if not created and self.signing_keys is not None:
            self.check_signed_by_us(task_id, key or "")
        if created and run_at is None:
            import kombu.exceptions

            from fleet.broker.publish import publish

            try:
                publish(self.app, self.settings, task_id, agent, host=host, priority=rank)
            except (kombu.exceptions.KombuError, OSError, redis.RedisError) as error:
                self.store.records.transition(task_id, State.FAILED, finished_at=now_iso(), error=TaskError(
                    kind=ErrorKind.LOST, message=f"could not publish: {error}"))
                raise StateStoreError(f"could not publish task {task_id}: {error}") from None
        return task_id

    def check_signed_by_us(self, task_id: str, key: str) -> None:
        """With signing on, the task an idempotency key already names must be
        one this submitter's keys signed: whoever may write records could
        otherwise put a task of their own (and its "result") under the key."""
        assert self.signing_keys is not None
        existing, payload = self.store.records.get_with_payload(task_id)
        refused = self.signing_keys.refusal(existing.id, existing.agent, existing.pinned_host, payload,
                                            existing.created_at, existing.signed_by, existing.signature)
        if refused is not None:
            raise UsageError(f"idempotency key {key!r} names task {task_id}, which this submitter did not "
                             f"sign: {refused}")

    def status(self, task_id: str) -> TaskRecord:
        return self.store.records.get(task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task is final; its record."""
        return next(self.as_completed([task_id], timeout))

    def wait_many(self, task_ids: Iterable[str], timeout: float | None = None) -> list[TaskRecord]:
        """Block until every task is final; their records, in the order given."""
        ids = list(task_ids)
        done = {record.id: record for record in self.as_completed(ids, timeout)}
        return [done[task_id] for task_id in ids]

    def as_completed(self, task_ids: Iterable[str], timeout: float | None = None) -> Iterator[TaskRecord]:
        """Each task's final record as it ends, the first to end first.

        All of them are followed at once (fleet.state.completion): one
        blocking read of all their event streams at a time, on one
        connection, no thread per task. WaitTimeout if any is not final
        within `timeout` seconds; TaskNotFound at once for an unknown id."""
        ids = list(dict.fromkeys(task_ids))
        completion = Completion(ids, self.store.events.last_ids(ids), timeout)
        while True:
            yield from completion.ended(self.store.records.many(completion.to_read))
            if completion.done:
                return
            completion.arrived(self.store.events.wait_any(completion.cursors, completion.block_ms()))

    def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a queued, retrying or running task; a finished one is
        returned unchanged."""
        return cancel(self.store, task_id, "cancelled by request")

    def retry(self, task_id: str) -> TaskRecord:
        """Run a finished task again: a new attempt under the same id, its
        previous outcome cleared (the events keep it). An operator's job:
        it removes the worker's mark that the task finished."""
        from fleet.broker.publish import publish

        before = self.store.records.get(task_id)
        if not before.state.final:
            raise UsageError(f"task {task_id} is {before.state}: only a finished task can be retried")
        settle_s = self.settings.lease_ttl_s + self.settings.kill_grace_s
        ended = datetime.fromisoformat(before.finished_at).timestamp() if before.finished_at else 0.0
        if before.started_at is not None and time.time() - ended < settle_s:
            raise UsageError(f"task {task_id} ended {time.time() - ended:.0f} s ago and its last run may "
                             f"still be stopping: retry it after {settle_s:g} s")
        record = self.store.records.reopen(task_id)
        self.store.events.add(task_id, "retry_requested", previous=str(before.state),
                              attempt=str(record.attempts + 1))
        publish(self.app, self.settings, task_id, record.agent, attempt=record.attempts + 1,
                host=record.pinned_host, priority=record.priority)
        return record

    def cancel_many(self, agent: str | None = None, state: State | str | None = None) -> list[str]:
        """Cancel every task matching the filters (queued, retrying or
        running ones; finished ones are left as they are); their ids."""
        matching = [r.id for r in self.tasks(agent, state, limit=BULK_LIMIT) if not r.state.final]
        return [task_id for task_id in matching if self.cancel(task_id).state == State.CANCELLED]

    def tasks(self, agent: str | None = None, state: State | str | None = None,
              limit: int = 1000, host: str | None = None, key: str | None = None,
              since: float | None = None) -> list[TaskRecord]:
        """The newest `limit` tasks matching every filter given, newest first."""
        return self.tasks_page(agent, state, limit, host, key, since).records

    def tasks_page(self, agent: str | None = None, state: State | str | None = None,
                   limit: int = 1000, host: str | None = None, key: str | None = None,
                   since: float | None = None, cursor: str | None = None) -> Page:
        """A page of the tasks matching every filter given (`host`: ran or
        runs there, or pinned to it; `key`: the task of that idempotency
        key; `since`: created at or after, epoch seconds), newest first;
        pass its cursor back for the next page (fleet.state.listing)."""
        if agent is not None:
            self.settings.agent(agent)
        filters = Filters(agent=agent, state=State(state) if state else None, host=host, since=since)
        if key is not None:
            return Page(self.store.listing.by_key(key, filters)[:limit], None)
        try:
            return self.store.listing.page(filters, limit, cursor)
        except BadCursor as error:
            raise UsageError(f"cursor: {error}") from None

    def resume(self, agent: str, why: str) -> bool:
        """Close the agent's breaker on every host; False if it was not open."""
        self.settings.agent(agent)
        return self.breaker.resume(agent, why)

    def token_rotated(self, agent: str, name: str) -> list[str]:
        """After `fleet tokens set`: resume the agent and run at once the
        tasks waiting to retry a credential failure (their delayed retry,
        when it comes, finds the attempt started and is dropped)."""
        from fleet.broker.publish import republish

        self.resume(agent, f"token {name} rotated")
        retried = []
        for record in self.store.listing.find(Filters(agent=agent, state=State.RETRYING)):
            if record.error is not None and record.error.kind == ErrorKind.CREDENTIAL:
                republish(self.app, self.settings, record, record.attempts + 1)
                retried.append(record.id)
        return retried

    def queue_depth(self, agent: str, hosts: list[HostStatus] | None = None) -> int:
        """Messages waiting in the agent's shared queue and its queues pinned
        to the registered hosts (`hosts`, where the caller has read them)."""
        registered = self.hosts.all() if hosts is None else hosts
        queues = [queue_name(self.settings.namespace, agent, host)
                  for host in [None, *(h.registration.host_id for h in registered)]]
        return waiting_messages(self.store.redis, self.store.keys, queues)
