"""Task records in Redis: one hash per task, the indexes by agent and by
state, and every change of state.

Every state change is checked against the record it moves from and written
in one step only if the record is still at that revision (a Lua script;
reclaiming a lost attempt is a WATCH/MULTI transaction), so a finished task
never goes back to running and two writers cannot both move one task. Keys
come from `fleet.state.keys` only."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from redis.client import Pipeline

from fleet.connection import redis_errors
from fleet.errors import StaleTransition, StateStoreError, TaskNotFound
from fleet.record import FINAL_STATES, State, TaskRecord, now_iso
from fleet.state.celery_result import celery_meta
from fleet.state.deliveries import schedule as schedule_deliveries
from fleet.state.events import EVENTS_MAXLEN
from fleet.state.keys import Keys
from fleet.state.scripts import load_script
from fleet.state.stats import count_change

# `revision` is kept as a plain counter beside the JSON-encoded fields.
CHANGES_MAXLEN = 100_000  # the fleet-wide changes stream keeps about this many (some 25,000 tasks')
RECORD_FIELDS = tuple(name for name in TaskRecord.model_fields if name != "revision")
READ_FIELDS = [*RECORD_FIELDS, "revision"]  # what a read of records without payloads asks for

# The on_done hooks of a task's end: (agent, the task's own hooks) → hook names.
OnDoneHooks = Callable[[str, list[str]], list[str]]
# Signs a new task: (task id, agent, pinned host, payload, created at) → (key id, signature).
Signer = Callable[[str, str, str | None, dict[str, Any], str], tuple[str, str]]

# Which state each state may move to; anything else is refused.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.SCHEDULED: frozenset({State.QUEUED, State.CANCELLED}),
    State.QUEUED: frozenset({State.RUNNING, State.RETRYING, State.CANCELLED, State.FAILED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.RETRYING, State.CANCELLED}),
    State.RETRYING: frozenset({State.RUNNING, State.RETRYING, State.CANCELLED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


def new_task_id() -> str:
    return uuid.uuid4().hex


class TaskRecords:
    def __init__(self, client: redis.Redis, keys: Keys, retention_s: int,
                 on_done: OnDoneHooks | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.retention_s = retention_s
        self.on_done = on_done  # the hooks a task's end is delivered to (none: no deliveries)
        self._apply_at_revision = load_script(client, "apply_at_revision")

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The record, without its payload."""
        record = self.maybe_many([task_id])[0]
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def many(self, task_ids: list[str]) -> list[TaskRecord]:
        """The records of these tasks, in one round trip; TaskNotFound for the first missing."""
        return every_record(task_ids, self.maybe_many(task_ids))

    def get_with_payload(self, task_id: str) -> tuple[TaskRecord, dict[str, Any]]:
        """The record and its payload, in one read."""
        raw = self._call(self.redis.hgetall, self.keys.task(task_id))
        if not raw:
            raise TaskNotFound(task_id)
        try:
            return decode_record(raw, task_id), json.loads(raw.get("payload", "{}"))
        except (ValueError, TypeError):  # not a record fleet could have written: none to act on
            raise TaskNotFound(task_id) from None

    def queued_before(self, agent: str, before: float) -> list[TaskRecord]:
        """The agent's tasks that have been `queued` since before `before` (epoch seconds)."""
        ids = self._call(self.redis.zrangebyscore, self.keys.by_state(State.QUEUED), 0, before)
        return [record for record in self.maybe_many(ids)
                if record is not None and record.agent == agent and record.state == State.QUEUED]

    def maybe_many(self, ids: list[str]) -> list[TaskRecord | None]:
        """Records without their payloads (up to payload_limit each), in one
        round trip; None for a missing one, and for a key that holds no
        record fleet could have written (another type, fields that do not
        decode, or another task's id): whoever may write records must not
        stop their readers, nor aim a writer at another task."""
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(self.keys.task(task_id), READ_FIELDS)
            rows = self._call(pipe.execute, raise_on_error=False)
        return [readable_record(values, task_id) for task_id, values in zip(ids, rows, strict=True)]

    def take_republish_turn(self, task_id: str, hold_s: float) -> bool:
        """Whether this consumer is the one to publish a lost message again:
        the first to take a mark that lasts `hold_s`."""
        return bool(self._call(self.redis.set, self.keys.republishing(task_id), "1", nx=True,
                               px=int(hold_s * 1000)))

    # -- writing -------------------------------------------------------------

    def finished_before(self, task_id: str) -> bool:
        """Whether the task reached a final state once, whatever its record says now."""
        return bool(self._call(self.redis.exists, self.keys.finished(task_id)))

    def create(self, agent: str, payload: dict[str, Any], key: str | None = None,
               pinned_host: str | None = None, signer: Signer | None = None,
               run_at: float | None = None, priority: int = 3,
               on_done: list[str] | None = None) -> tuple[str, bool]:
        """A new queued record (signed by `signer`, if given), or with
        `run_at` (epoch seconds) a `scheduled` one in its agent's schedule.
        With an idempotency key already used, the existing task's id and
        False (nothing is written)."""
        task_id = new_task_id()
        if key is not None:
            claimed = self._call(self.redis.set, self.keys.idempotency(key), task_id, nx=True)
            if not claimed:
                existing = self._call(self.redis.get, self.keys.idempotency(key))
                if existing is not None:
                    return str(existing), False
                return self.create(agent, payload, key, pinned_host, signer, run_at, priority,
                                   on_done)  # expired
        created_at = now_iso()
        signed_by, signature = (signer(task_id, agent, pinned_host, payload, created_at) if signer
                                else (None, None))
        record = TaskRecord(id=task_id, agent=agent, state=State.QUEUED, created_at=created_at,
                            key=key, pinned_host=pinned_host, signed_by=signed_by, signature=signature,
                            priority=priority, on_done=list(dict.fromkeys(on_done or [])))
        if run_at is not None:
            due = datetime.fromtimestamp(run_at, UTC).isoformat(timespec="milliseconds")
            record = record.model_copy(update={"state": State.SCHEDULED, "run_at": due})
        with self.redis.pipeline(transaction=True) as pipe:
            self._write_new(pipe, record, payload)
            if run_at is not None:
                pipe.zadd(self.keys.schedule(agent), {task_id: run_at})
            written = self._call(pipe.execute, raise_on_error=False)
        if isinstance(written[0], Exception):  # the record itself (an index or stream may fail alone)
            raise StateStoreError(f"task {task_id} not written: {written[0]}")
        return task_id, True

    def due(self, agent: str, now: float, limit: int = 100) -> list[str]:
        """The agent's scheduled tasks whose time has come, soonest first."""
        return list(self._call(self.redis.zrangebyscore, self.keys.schedule(agent), 0, now, 0, limit))

    def reschedule(self, agent: str, task_id: str, run_at: float) -> None:
        self._call(self.redis.zadd, self.keys.schedule(agent), {task_id: run_at})

    def unschedule(self, agent: str, task_id: str) -> None:
        self._call(self.redis.zrem, self.keys.schedule(agent), task_id)

    def adopt(self, task_id: str, agent: str, payload: Any, created_at: str | None = None,
              signed_by: str | None = None,
              signature: str | None = None) -> tuple[TaskRecord | None, bool]:
        """A queued record for a task a publisher sent with its payload
        (fleet.broker.message): written unless one with this id exists, which
        is returned with False (a redelivery, or an id already used). None
        and False if a task of this id finished within `retention_s` and its
        record is gone: an id is never run twice, nor its result replaced."""
        record = TaskRecord(id=task_id, agent=agent, state=State.QUEUED,
                            created_at=created_at or now_iso(), signed_by=signed_by, signature=signature)
        key, finished = self.keys.task(task_id), self.keys.finished(task_id)
        existing: list[TaskRecord | None] = []

        def write(pipe: Pipeline) -> None:
            if pipe.exists(key):
                existing.append(self.get(task_id))
                return
            if pipe.exists(finished):
                existing.append(None)
                return
            pipe.multi()
            self._write_new(pipe, record, payload)

        self._call(self.redis.transaction, write, key, finished)
        return (existing[0], False) if existing else (record, True)

    def reopen(self, task_id: str) -> TaskRecord:
        """A finished task queued again for a new attempt under the same id
        (`fleet retry`): its outcome cleared, its finished mark and Celery
        result removed, its record kept again. StaleTransition unless final."""
        return self.transition(task_id, State.QUEUED, reopen=True, require=None, error=None, result=None,
                               exit_code=None, started_at=None, finished_at=None, retry_at=None)

    def forbid(self, task_id: str) -> bool:
        """Mark an id as a finished (cancelled) task's, for `retention_s`, so
        no message can start a task under it (a revoke that came before any
        consumer wrote the record); False if the id has a record."""
        def write(pipe: Pipeline) -> bool:
            if pipe.exists(self.keys.task(task_id)):
                return False
            pipe.multi()
            pipe.set(self.keys.finished(task_id), State.CANCELLED, ex=self.retention_s, nx=True)
            return True

        return bool(self._call(self.redis.transaction, write, self.keys.task(task_id),
                               value_from_callable=True))

    def _write_new(self, pipe: Pipeline, record: TaskRecord, payload: Any) -> None:
        task_id, now = record.id, time.time()
        pipe.hset(self.keys.task(task_id), mapping={**encode_record(record),
                                                     "payload": json.dumps(payload)})
        pipe.zadd(self.keys.by_agent(record.agent), {task_id: now})
        pipe.zadd(self.keys.by_state(record.state), {task_id: now})
        self.state_event(pipe, record)

    def transition(self, task_id: str, to: State, *,
                   update: Callable[[TaskRecord], dict[str, Any]] | None = None,
                   epoch: int | None = None, lease: tuple[str, int] | None = None,
                   current: TaskRecord | None = None, require: State | None = None,
                   reopen: bool = False, **fields: Any) -> TaskRecord:
        """Move a task to `to`, checking the move is allowed, and set fields.

        `update` computes fields from the current record (e.g. attempts + 1).
        `epoch` fences the write: it is refused unless the task is still on
        that attempt, so a consumer that lost its lease (a partition, a
        pause) cannot overwrite the attempt that took over; `require` refuses
        it unless the task is in that state. `lease` (owner,
        ms) sets the attempt's lease in the same write. `current` is the
        caller's fresh read of the record, which saves reading it again.
        `reopen` allows a final task back to `queued` (see `reopen`).

        The writes apply only if the record is still at the revision they
        were computed from (one Lua call); if it changed meanwhile, the
        record is read again and the move checked again. Raises
        StaleTransition if refused."""
        key = self.keys.task(task_id)
        trusted = current is None  # a caller's copy is re-checked on a fresh read before refusing
        while True:
            if current is None:
                current = self.get(task_id)
            try:
                if require is not None and current.state != require:
                    raise StaleTransition(f"task {task_id} is {current.state}, no longer {require}")
                record, commands = self._transition_writes(current, to, update, epoch, lease, fields,
                                                           reopen)
            except StaleTransition:
                if trusted:
                    raise
                current, trusted = None, True
                continue
            expected = [current.revision, json.dumps(current.state), json.dumps(current.attempts)]
            applied = self._call(self._apply_at_revision, [key], [*expected, *commands])
            if applied == 1:
                return record
            if applied == -1:
                raise TaskNotFound(task_id)
            current, trusted = None, True  # changed since it was read

    def _transition_writes(self, current: TaskRecord, to: State,
                           update: Callable[[TaskRecord], dict[str, Any]] | None, epoch: int | None,
                           lease: tuple[str, int] | None, fields: dict[str, Any],
                           reopen: bool = False) -> tuple[TaskRecord, list[str]]:
        """The record after the move and the commands that write it."""
        task_id = current.id
        reopening = reopen and current.state.final and to == State.QUEUED
        if to not in TRANSITIONS[current.state] and not reopening:
            raise StaleTransition(f"task {task_id} is {current.state}, cannot become {to}")
        if epoch is not None and current.attempts != epoch:
            raise StaleTransition(f"task {task_id} is on attempt {current.attempts}; "
                                  f"a write of attempt {epoch} is stale")
        changes = {**fields, **(update(current) if update else {}), "state": to,
                   "revision": current.revision + 1}
        record = current.model_copy(update=changes)
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:  # collects the commands, sends nothing
            if reopening:  # first: a client that may not write the marks is refused before any write
                pipe.delete(self.keys.finished(task_id), self.keys.celery_result(task_id))
                pipe.persist(self.keys.task(task_id))
                pipe.persist(self.keys.events(task_id))
                if current.key is not None:
                    pipe.persist(self.keys.idempotency(current.key))
            if lease is not None:
                pipe.set(self.keys.lease(task_id), f"{lease[0]}|{record.attempts}", px=lease[1])
            pipe.hset(self.keys.task(task_id), mapping=encode_record(record))
            pipe.hincrby(self.keys.task(task_id), "revision", 1)
            pipe.zrem(self.keys.by_state(current.state), task_id)
            pipe.zadd(self.keys.by_state(to), {task_id: now})
            self.state_event(pipe, record, current.state)
            if to != State.RUNNING:  # the attempt is over: so are its lease and its slot
                pipe.delete(self.keys.lease(task_id))
                if current.state == State.RUNNING:
                    pipe.zrem(self.keys.running(record.agent), task_id)
            if to in FINAL_STATES:
                self._expire_finished(pipe, record, now)
                if self.on_done is not None and (hooks := self.on_done(record.agent, record.on_done)):
                    schedule_deliveries(pipe, self.keys, record, hooks, now)
                    pipe.publish(self.keys.on_done_notice, record.id)
            self.write_celery_result(pipe, record)
            commands = [word for args, _ in pipe.command_stack
                         for word in (len(args), *best_effort(args, self.keys.namespace))]
        return record, [word.decode() if isinstance(word, bytes) else str(word) for word in commands]

    def state_event(self, pipe: Pipeline, record: TaskRecord, before: State | None = None) -> None:
        """A change of state (from `before`), in the task's events and in the
        fleet-wide changes stream (with the kind of error it records, if
        any), and counted (fleet.state.stats)."""
        count_change(pipe, self.keys, before, record)
        change: dict[Any, Any] = {"state": str(record.state), "attempt": str(record.attempts)}
        if record.error is not None and record.state != State.SUCCEEDED:
            change["error"] = record.error.kind
        pipe.xadd(self.keys.events(record.id), {"type": "state", **change}, maxlen=EVENTS_MAXLEN,
                  approximate=True)
        pipe.xadd(self.keys.changes, {"task": record.id, "agent": record.agent, **change},
                  maxlen=CHANGES_MAXLEN, approximate=True)

    def write_celery_result(self, pipe: Pipeline, record: TaskRecord) -> None:
        """The record's state where a Celery client's `AsyncResult` reads it,
        and published on that key's channel, where `AsyncResult.get()` waits."""
        if (meta := celery_meta(record)) is not None:
            key = self.keys.celery_result(record.id)
            pipe.set(key, meta, ex=self.retention_s)
            pipe.publish(key, meta)

    def _expire_finished(self, pipe: Pipeline, record: TaskRecord, now: float) -> None:
        for key in (self.keys.task(record.id), self.keys.events(record.id)):
            pipe.expire(key, self.retention_s)
        pipe.set(self.keys.finished(record.id), record.state, ex=self.retention_s)
        if record.key is not None:
            pipe.expire(self.keys.idempotency(record.key), self.retention_s)
        for state in FINAL_STATES:
            pipe.zremrangebyscore(self.keys.by_state(state), 0, now - self.retention_s)
        pipe.zremrangebyscore(self.keys.by_agent(record.agent), 0, now - self.retention_s)

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with redis_errors():
            return method(*args, **kwargs)


def best_effort(args: tuple[Any, ...], namespace: str) -> tuple[Any, ...]:
    """A transition's command, marked for apply_at_revision.lua to run
    best-effort if it writes a key a submitter may write too (its events,
    the changes stream, an index): a key forged to another type then costs
    that write, not the transition's later ones (the finished mark, the
    lease, the slot, the on_done deliveries)."""
    key = str(args[1]) if len(args) > 1 else ""
    shared = key.startswith(f"{namespace}:index:") or key.endswith(":events")
    return (f"?{args[0]}", *args[1:]) if shared else args


def encode_record(record: TaskRecord) -> dict[str, str]:
    data = record.model_dump(mode="json")
    return {name: json.dumps(data[name]) for name in RECORD_FIELDS}


def readable_record(values: Any, task_id: str | None = None) -> TaskRecord | None:
    """A record from an HMGET of READ_FIELDS; None if there is none to read."""
    if not isinstance(values, list) or values[0] is None:  # missing, or a key of another type
        return None
    try:
        return decode_record({f: v for f, v in zip(READ_FIELDS, values, strict=True) if v is not None},
                             task_id)
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return None


def every_record(task_ids: list[str], records: list[TaskRecord | None]) -> list[TaskRecord]:
    """The records read for `task_ids`; TaskNotFound for the first that has none."""
    for task_id, record in zip(task_ids, records, strict=True):
        if record is None:
            raise TaskNotFound(task_id)
    return [r for r in records if r is not None]


def decode_record(raw: dict[str, str], task_id: str | None = None) -> TaskRecord:
    """A record from its hash; with `task_id` (the key it was read under),
    ValueError unless it says that id: every write of a transition is
    aimed by the record's id, and whoever may write records could otherwise
    put a victim's id in a record of their own (found in review)."""
    record = TaskRecord.model_validate(
        {**{name: json.loads(raw[name]) for name in RECORD_FIELDS if name in raw},
         "revision": int(raw.get("revision", 0))}
    )
    if task_id is not None and record.id != task_id:
        raise ValueError(f"the record under task {task_id} says it is task {record.id!r:.80}")
    return record


