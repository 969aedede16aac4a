"""Task state in Redis: records, their event streams and the indexes.

Every state change is checked against the record it moves from and written
in one step only if the record is still at that revision (a Lua script;
reclaiming a lost attempt is a WATCH/MULTI transaction), so a finished task
never goes back to running and two writers cannot both move one task. Keys
come from `fleet.keys` only."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.sentinel import Sentinel

from fleet.errors import LeaseHeld, StaleTransition, StateStoreError, TaskNotFound
from fleet.keys import Keys
from fleet.record import FINAL_STATES, ErrorKind, State, TaskError, TaskRecord, now_iso
from fleet.settings import FleetSettings, is_sentinel_url, parse_sentinel_url

EVENTS_MAXLEN = 20_000

# Renew a lease only if it is still ours; take it back if it vanished (a
# Redis restart that outlived its TTL) while the record still shows our
# attempt running. KEYS: lease, task; ARGV: owner|attempt, ms, attempt.
RENEW_LEASE = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if held then return 0 end
if redis.call('hget', KEYS[2], 'state') == '"running"'
   and redis.call('hget', KEYS[2], 'attempts') == ARGV[3] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RELEASE_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Append to a task's event stream only while the task is still on the
# writer's attempt and that attempt was not declared lost (a `retrying`
# task runs no attempt): the fencing token of output and events, as the
# epoch is of state transitions. KEYS: task, events; ARGV: attempt, maxlen,
# field, value, … Returns why it was refused, nothing when written.
FENCED_XADD = """
local current = redis.call('hget', KEYS[1], 'attempts')
if not current then return 'gone' end
if current ~= ARGV[1] then return 'on attempt ' .. current end
if redis.call('hget', KEYS[1], 'state') == '"retrying"' then return 'retrying' end
redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return false
"""
# Apply a transition's writes only if the record is still at the revision
# they were computed from: optimistic concurrency in one round trip instead
# of WATCH, HGETALL, MULTI/EXEC. The state and attempt are compared too, so
# a writer that does not count revisions is not overwritten either. KEYS:
# task; ARGV: revision, state, attempts (JSON), then each command as its word
# count and its words. 1: applied; 0: the record changed
# (read it again); -1: it is gone.
APPLY_AT_REVISION = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
if (redis.call('hget', KEYS[1], 'revision') or '0') ~= ARGV[1]
   or redis.call('hget', KEYS[1], 'state') ~= ARGV[2]
   or redis.call('hget', KEYS[1], 'attempts') ~= ARGV[3] then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""
# `revision` is kept as a plain counter beside the JSON-encoded fields.
RECORD_FIELDS = tuple(name for name in TaskRecord.model_fields if name != "revision")

# Which state each state may move to; anything else is refused.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.RETRYING, State.CANCELLED, State.FAILED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.RETRYING, State.CANCELLED}),
    State.RETRYING: frozenset({State.RUNNING, State.RETRYING, State.CANCELLED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class Event:
    id: str
    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("type", "")


def connect_redis(settings: FleetSettings, **options: Any) -> redis.Redis:
    """fleet's own connection to Redis (records, streams, control). With a
    `sentinel://` redis_url the sentinels name the primary, and name it again
    after a failover; `options` are redis-py's (decode_responses=True by default)."""
    url = settings.redis_url
    options = {"decode_responses": True, "health_check_interval": 30, **options}
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinels = Sentinel(list(parsed.nodes), **sentinel_options)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, db=parsed.db, username=parsed.username,
        password=parsed.password, **options)
    return client


def new_task_id() -> str:
    return uuid.uuid4().hex


class TaskStore:
    def __init__(self, client: redis.Redis, namespace: str, retention_s: int) -> None:
        self.redis = client
        self.keys = Keys(namespace)
        self.retention_s = retention_s
        self._renew = client.register_script(RENEW_LEASE)
        self._release = client.register_script(RELEASE_LEASE)
        self._fenced_xadd = client.register_script(FENCED_XADD)
        self._apply_at_revision = client.register_script(APPLY_AT_REVISION)

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The record, without its payload."""
        record = self._records([task_id])[0]
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def get_with_payload(self, task_id: str) -> tuple[TaskRecord, dict[str, Any]]:
        """The record and its payload, in one read."""
        raw = self._call(self.redis.hgetall, self.keys.task(task_id))
        if not raw:
            raise TaskNotFound(task_id)
        payload: dict[str, Any] = json.loads(raw.get("payload", "{}"))
        return decode_record(raw), payload

    def list_tasks(self, agent: str | None = None, state: State | None = None,
                   limit: int = 1000) -> list[TaskRecord]:
        """Newest first. Index entries whose record has expired are pruned."""
        if state is not None:
            index = self.keys.by_state(state)
        elif agent is not None:
            index = self.keys.by_agent(agent)
        else:
            index = None
        ids = self._all_ids(limit) if index is None else self._call(
            self.redis.zrevrange, index, 0, limit - 1)
        records = []
        for task_id, record in zip(ids, self._records(ids), strict=True):
            if record is None:
                self._prune(task_id, index)
                continue
            if agent not in (None, record.agent) or state not in (None, record.state):
                continue
            records.append(record)
        return records

    def queued_before(self, agent: str, before: float) -> list[TaskRecord]:
        """The agent's tasks that have been `queued` since before `before` (epoch seconds)."""
        ids = self._call(self.redis.zrangebyscore, self.keys.by_state(State.QUEUED), 0, before)
        return [record for record in self._records(ids)
                if record is not None and record.agent == agent and record.state == State.QUEUED]

    def _records(self, ids: list[str]) -> list[TaskRecord | None]:
        """Records without their payloads (up to payload_limit each), in one round trip."""
        fields = [*RECORD_FIELDS, "revision"]
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(self.keys.task(task_id), fields)
            rows = self._call(pipe.execute)
        return [None if values[0] is None else decode_record(
                    {f: v for f, v in zip(fields, values, strict=True) if v is not None})
                for values in rows]

    def take_republish_turn(self, task_id: str, hold_s: float) -> bool:
        """Whether this consumer is the one to publish a lost message again:
        the first to take a mark that lasts `hold_s`."""
        return bool(self._call(self.redis.set, self.keys.republishing(task_id), "1", nx=True,
                               px=int(hold_s * 1000)))

    def _all_ids(self, limit: int) -> list[str]:
        ids: dict[str, float] = {}
        for state in State:
            for task_id, score in self._call(
                self.redis.zrevrange, self.keys.by_state(state), 0, limit - 1, withscores=True
            ):
                ids[task_id] = score
        return sorted(ids, key=lambda i: ids[i], reverse=True)[:limit]

    def _prune(self, task_id: str, index: str | None) -> None:
        """Drop an expired task from the indexes (its agent's index is trimmed
        by age when tasks finish)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key in [index] if index else []:
                pipe.zrem(key, task_id)
            for state in State:
                pipe.zrem(self.keys.by_state(state), task_id)
            self._call(pipe.execute)

    def events(self, task_id: str, after: str = "0-0", block_ms: int | None = None,
               count: int = 1000) -> list[Event]:
        """Events after the id `after`; with block_ms, waits that long for one."""
        key = self.keys.events(task_id)
        if block_ms is None:
            rows = self._call(self.redis.xrange, key, f"({after}" if after != "0-0" else "-",
                              "+", count)
            return [Event(i, f) for i, f in rows]
        reply = self._call(self.redis.xread, {key: after}, count=count, block=block_ms)
        return [Event(i, f) for _, entries in reply for i, f in entries]

    def wait_for_events(self, cursors: dict[str, str], block_ms: int) -> None:
        """Block until any of these tasks (id → last event id seen) has a new
        event, or block_ms passes; advances the cursors."""
        streams: dict[Any, Any] = {self.keys.events(i): c for i, c in cursors.items()}
        by_key = {self.keys.events(i): i for i in cursors}
        for key, entries in self._call(self.redis.xread, streams, block=block_ms) or []:
            cursors[by_key[key]] = entries[-1][0]

    def last_event_id(self, task_id: str) -> str:
        rows = self._call(self.redis.xrevrange, self.keys.events(task_id), "+", "-", 1)
        return str(rows[0][0]) if rows else "0-0"

    def wait_final(self, task_id: str, timeout: float | None) -> TaskRecord | None:
        """Block on the task's event stream until it is final; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = self.last_event_id(task_id)
        may_be_final = True
        while True:
            if may_be_final:
                record = self.get(task_id)
                if record.state.final:
                    return record
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            block = 5000 if remaining is None else max(1, min(5000, int(remaining * 1000)))
            events = self.events(task_id, after=cursor, block_ms=block)
            cursor = events[-1].id if events else cursor
            # Read the record again only when it may have become final (or
            # after a quiet spell): output and `running` events do not end it.
            may_be_final = not events or any(
                e.type == "state" and State(e.fields["state"]).final for e in events)

    # -- writing -------------------------------------------------------------

    def create(self, agent: str, payload: dict[str, Any], key: str | None = None,
               pinned_host: str | None = None) -> tuple[str, bool]:
        """A new queued record. With an idempotency key already used, the
        existing task's id and False (nothing is written)."""
        task_id = new_task_id()
        if key is not None:
            claimed = self._call(self.redis.set, self.keys.idempotency(key), task_id, nx=True)
            if not claimed:
                existing = self._call(self.redis.get, self.keys.idempotency(key))
                if existing is not None:
                    return str(existing), False
                return self.create(agent, payload, key, pinned_host)  # expired between the calls
        record = TaskRecord(id=task_id, agent=agent, state=State.QUEUED, created_at=now_iso(),
                            key=key, pinned_host=pinned_host)
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.task(task_id), mapping={**encode_record(record),
                                                         "payload": json.dumps(payload)})
            pipe.zadd(self.keys.by_agent(agent), {task_id: now})
            pipe.zadd(self.keys.by_state(State.QUEUED), {task_id: now})
            pipe.xadd(self.keys.events(task_id), {"type": "state", "state": State.QUEUED},
                      maxlen=EVENTS_MAXLEN, approximate=True)
            self._call(pipe.execute)
        return task_id, True

    def transition(self, task_id: str, to: State, *,
                   update: Callable[[TaskRecord], dict[str, Any]] | None = None,
                   epoch: int | None = None, lease: tuple[str, int] | None = None,
                   current: TaskRecord | None = None, require: State | None = None,
                   **fields: Any) -> TaskRecord:
        """Move a task to `to`, checking the move is allowed, and set fields.

        `update` computes fields from the current record (e.g. attempts + 1).
        `epoch` fences the write: it is refused unless the task is still on
        that attempt, so a consumer that lost its lease (a partition, a
        pause) cannot overwrite the attempt that took over; `require` refuses
        it unless the task is in that state. `lease` (owner,
        ms) sets the attempt's lease in the same write. `current` is the
        caller's fresh read of the record, which saves reading it again.

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
                record, commands = self._transition_writes(current, to, update, epoch, lease, fields)
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
                           lease: tuple[str, int] | None,
                           fields: dict[str, Any]) -> tuple[TaskRecord, list[str]]:
        """The record after the move and the commands that write it."""
        task_id = current.id
        if to not in TRANSITIONS[current.state]:
            raise StaleTransition(f"task {task_id} is {current.state}, cannot become {to}")
        if epoch is not None and current.attempts != epoch:
            raise StaleTransition(f"task {task_id} is on attempt {current.attempts}; "
                                  f"a write of attempt {epoch} is stale")
        changes = {**fields, **(update(current) if update else {}), "state": to,
                   "revision": current.revision + 1}
        record = current.model_copy(update=changes)
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:  # collects the commands, sends nothing
            if lease is not None:
                pipe.set(self.keys.lease(task_id), f"{lease[0]}|{record.attempts}", px=lease[1])
            pipe.hset(self.keys.task(task_id), mapping=encode_record(record))
            pipe.hincrby(self.keys.task(task_id), "revision", 1)
            pipe.zrem(self.keys.by_state(current.state), task_id)
            pipe.zadd(self.keys.by_state(to), {task_id: now})
            event: dict[Any, Any] = {"type": "state", "state": str(to),
                                     "attempt": str(record.attempts)}
            if record.error is not None and to != State.SUCCEEDED:
                event["error"] = record.error.kind
            pipe.xadd(self.keys.events(task_id), event, maxlen=EVENTS_MAXLEN, approximate=True)
            if to != State.RUNNING:  # the attempt is over: so is its lease
                pipe.delete(self.keys.lease(task_id))
            if to in FINAL_STATES:
                self._expire_finished(pipe, record, now)
            commands = [word for args, _ in pipe.command_stack for word in (len(args), *args)]
        return record, [word.decode() if isinstance(word, bytes) else str(word) for word in commands]

    # -- leases ----------------------------------------------------------------

    def claim(self, record: TaskRecord, attempt: int | None, owner: str, ttl_ms: int,
              **fields: Any) -> TaskRecord:
        """Start the next attempt of a task, under a lease.

        Refused (StaleTransition) if the task is final, or if this message's
        attempt has already started (a duplicate or a redelivery). A task
        still `running` under a live lease is left alone (LeaseHeld); one
        whose lease expired was lost and is taken over: that attempt is
        recorded `lost` and the next one starts here.

        `record` is the caller's fresh read; the write applies only at its
        revision, so a change since is read and checked again (the epoch),
        never overwritten."""
        task_id, current = record.id, record
        if record.state == State.RUNNING:  # its attempt may have been lost: take it over
            if self.lease_owner(task_id) is not None:
                raise LeaseHeld(f"task {task_id} attempt {record.attempts} runs under a live lease")
            reclaimed = self.reclaim(task_id)
            if reclaimed is None:
                raise LeaseHeld(f"task {task_id} was taken over meanwhile")
            attempt, current, record = None, self.get(task_id), reclaimed
        elif attempt is not None and record.attempts >= attempt:
            raise StaleTransition(f"task {task_id}: attempt {attempt} has already started")
        return self.transition(task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1},
                               epoch=record.attempts if attempt is None else attempt - 1,
                               lease=(owner, ttl_ms), current=current, error=None, exit_code=None,
                               retry_at=None, started_at=now_iso(), **fields)

    def reclaim(self, task_id: str) -> TaskRecord | None:
        """A running task whose lease expired: record the attempt `lost` and
        make it due again now. None if it is not (or no longer) lost."""
        key, lease_key = self.keys.task(task_id), self.keys.lease(task_id)
        result: list[TaskRecord] = []

        def apply(pipe: Pipeline) -> None:
            raw: dict[str, str] = pipe.hgetall(key)  # type: ignore[assignment]
            if not raw or pipe.exists(lease_key):
                return
            current = decode_record(raw)
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
            entry: dict[Any, Any] = {"type": "state", "state": str(State.RETRYING),
                                     "attempt": str(record.attempts), "error": ErrorKind.LOST}
            pipe.xadd(self.keys.events(task_id), entry, maxlen=EVENTS_MAXLEN, approximate=True)
            result.append(record)

        self._call(self.redis.transaction, apply, key, lease_key)
        return result[-1] if result else None

    def lease_owner(self, task_id: str) -> str | None:
        value = self._call(self.redis.get, self.keys.lease(task_id))
        return None if value is None else str(value)

    def renew_lease(self, task_id: str, owner: str, attempt: int, ttl_ms: int) -> bool:
        return bool(self._call(self._renew, [self.keys.lease(task_id), self.keys.task(task_id)],
                               [f"{owner}|{attempt}", ttl_ms, str(attempt)]))

    def release_lease(self, task_id: str, owner: str, attempt: int) -> None:
        self._call(self._release, [self.keys.lease(task_id)], [f"{owner}|{attempt}"])

    def _expire_finished(self, pipe: Pipeline, record: TaskRecord, now: float) -> None:
        for key in (self.keys.task(record.id), self.keys.events(record.id)):
            pipe.expire(key, self.retention_s)
        if record.key is not None:
            pipe.expire(self.keys.idempotency(record.key), self.retention_s)
        for state in FINAL_STATES:
            pipe.zremrangebyscore(self.keys.by_state(state), 0, now - self.retention_s)
        pipe.zremrangebyscore(self.keys.by_agent(record.agent), 0, now - self.retention_s)

    def append_output(self, task_id: str, epoch: int, stream: str, data: str) -> None:
        """Record output of attempt `epoch`; StaleTransition if the task has moved on."""
        self._append(task_id, epoch, {"type": "output", "stream": stream, "data": data})

    def add_event(self, task_id: str, kind: str, epoch: int | None = None, **fields: str) -> None:
        """Record an event; with `epoch`, only while the task is on that
        attempt (StaleTransition otherwise)."""
        entry: dict[str, str] = {"type": kind, **fields}
        if epoch is not None:
            self._append(task_id, epoch, entry)
            return
        self._call(self.redis.xadd, self.keys.events(task_id), entry,
                   maxlen=EVENTS_MAXLEN, approximate=True)

    def _append(self, task_id: str, epoch: int, entry: dict[str, str]) -> None:
        flat = [part for pair in entry.items() for part in pair]
        refused = self._call(self._fenced_xadd, [self.keys.task(task_id), self.keys.events(task_id)],
                             [json.dumps(epoch), EVENTS_MAXLEN, *flat])
        if refused is not None:
            raise StaleTransition(f"task {task_id} is {refused}; a write of attempt {epoch} is stale")

    def output(self, task_id: str) -> Iterator[Event]:
        """All output events recorded so far, oldest first."""
        cursor = "0-0"
        while True:
            batch = self.events(task_id, after=cursor)
            if not batch:
                return
            for event in batch:
                cursor = event.id
                if event.type == "output":
                    yield event

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with redis_errors():
            return method(*args, **kwargs)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis failures as fleet's own one-line error."""
    try:
        yield
    except redis.RedisError as error:
        raise StateStoreError(f"Redis: {error}") from None


def encode_record(record: TaskRecord) -> dict[str, str]:
    data = record.model_dump(mode="json")
    return {name: json.dumps(data[name]) for name in RECORD_FIELDS}


def decode_record(raw: dict[str, str]) -> TaskRecord:
    return TaskRecord.model_validate(
        {**{name: json.loads(raw[name]) for name in RECORD_FIELDS if name in raw},
         "revision": int(raw.get("revision", 0))}
    )


def error(kind: str, message: str) -> TaskError:
    return TaskError.model_validate({"kind": kind, "message": message})
