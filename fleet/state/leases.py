"""Leases: the claim of a task's attempt by one consumer, with an expiry the
consumer renews. A consumer that dies stops renewing; once its lease has
expired the attempt is recorded `lost` and taken over (`reclaim`). The
attempt number is the fencing token: a write of an attempt that is no longer
the task's current one is refused (see `records.transition` and the fenced
appends of `events`)."""

from __future__ import annotations

import time
from typing import Any

import redis
from redis.client import Pipeline

from fleet.connection import redis_errors
from fleet.errors import LeaseHeld, SlotsTaken, StaleTransition, TaskNotFound
from fleet.record import ErrorKind, State, TaskError, TaskRecord, now_iso
from fleet.state.keys import Keys
from fleet.state.records import TaskRecords, decode_record, encode_record
from fleet.state.scripts import load_script

SLOT_MARGIN_MS = 1000  # a max_running slot outlives its lease: it never runs out first


class Leases:
    def __init__(self, client: redis.Redis, keys: Keys, records: TaskRecords) -> None:
        self.redis = client
        self.keys = keys
        self.records = records
        self._renew = load_script(client, "renew_lease")
        self._take_slot = load_script(client, "take_slot")

    def claim(self, record: TaskRecord, attempt: int | None, owner: str, ttl_ms: int,
              max_running: int | None = None, **fields: Any) -> TaskRecord:
        """Start the next attempt of a task, under a lease.

        Refused (StaleTransition) if the task is final, or if this message's
        attempt has already started (a duplicate or a redelivery). A task
        still `running` under a live lease is left alone (LeaseHeld); one
        whose lease expired was lost and is taken over: that attempt is
        recorded `lost` and the next one starts here.

        `record` is the caller's fresh read; the write applies only at its
        revision, so a change since is read and checked again (the epoch),
        never overwritten.

        With `max_running`, the attempt first takes one of the agent's
        slots, fleet-wide (SlotsTaken if none is free); the slot is held
        as long as the lease and freed by the attempt's end."""
        task_id, current = record.id, record
        if record.state == State.RUNNING:  # its attempt may have been lost: take it over
            if self.owner(task_id) is not None:
                raise LeaseHeld(f"task {task_id} attempt {record.attempts} runs under a live lease")
            reclaimed = self.reclaim(task_id)  # which frees the lost attempt's slot
            if reclaimed is None:
                raise LeaseHeld(f"task {task_id} was taken over meanwhile")
            attempt, current, record = None, self.records.get(task_id), reclaimed
        elif attempt is not None and record.attempts >= attempt:
            raise StaleTransition(f"task {task_id}: attempt {attempt} has already started")
        taken = self.take_slot(record, max_running, ttl_ms) if max_running is not None else 0
        try:
            return self.records.transition(
                task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1},
                epoch=record.attempts if attempt is None else attempt - 1, lease=(owner, ttl_ms),
                current=current, error=None, exit_code=None, retry_at=None, started_at=now_iso(),
                **fields)
        except (StaleTransition, TaskNotFound):
            if taken == 1:  # ours alone: give it back (2: the run that holds it keeps it)
                with redis_errors():
                    self.redis.zrem(self.keys.running(record.agent), task_id)
            raise

    def take_slot(self, record: TaskRecord, max_running: int, ttl_ms: int) -> int:
        """One of the agent's slots for this task: 1 taken, 2 it holds one
        already; SlotsTaken if none is free."""
        with redis_errors():
            taken = int(self._take_slot([self.keys.running(record.agent)],
                                        [record.id, max_running, ttl_ms + SLOT_MARGIN_MS]))
        if not taken:
            raise SlotsTaken(f"agent {record.agent} runs its max_running={max_running} tasks")
        return taken

    def slots_taken(self, agent: str) -> int:
        """How many of the agent's slots are held (by leases that have not
        expired, on the server's clock)."""
        with redis_errors():
            return int(self._take_slot([self.keys.running(agent)], ["", 0, 0]))

    def reclaim(self, task_id: str) -> TaskRecord | None:
        """A running task whose lease expired: record the attempt `lost` and
        make it due again now. None if it is not (or no longer) lost."""
        key, lease_key = self.keys.task(task_id), self.keys.lease(task_id)
        result: list[TaskRecord] = []

        def apply(pipe: Pipeline) -> None:
            raw: dict[str, str] = pipe.hgetall(key)  # type: ignore[assignment]
            if not raw or pipe.exists(lease_key):
                return
            try:
                current = decode_record(raw, task_id)
            except ValueError:  # not a record a worker may act on
                return
            if current.state != State.RUNNING:
                return
            error = TaskError(kind=ErrorKind.LOST, message=(
                f"attempt {current.attempts} on {current.host} was lost: its lease expired"))
            record = current.model_copy(update={"state": State.RETRYING, "error": error,
                                                "retry_at": now_iso()})
            pipe.multi()
            pipe.hset(key, mapping=encode_record(record))
            pipe.hincrby(key, "revision", 1)
            pipe.zrem(self.keys.by_state(State.RUNNING), task_id)
            pipe.zadd(self.keys.by_state(State.RETRYING), {task_id: time.time()})
            pipe.zrem(self.keys.running(record.agent), task_id)
            self.records.state_event(pipe, record, State.RUNNING)
            self.records.write_celery_result(pipe, record)
            result.append(record)

        with redis_errors():
            self.redis.transaction(apply, key, lease_key)
        return result[-1] if result else None

    def owner(self, task_id: str) -> str | None:
        with redis_errors():
            value = self.redis.get(self.keys.lease(task_id))
        return None if value is None else str(value)

    def renew(self, task_id: str, agent: str, owner: str, attempt: int, ttl_ms: int,
              max_running: int | None = None) -> bool:
        """Renew the attempt's lease; with its agent's `max_running`, its
        slot too (a lease taken back takes a slot back only if one is free)."""
        with redis_errors():
            return bool(self._renew([self.keys.lease(task_id), self.keys.task(task_id),
                                     self.keys.running(agent)],
                                    [f"{owner}|{attempt}", ttl_ms, str(attempt), task_id, max_running or 0]))
