"""The deliveries of on_done hooks, kept in Redis so that none is lost with
the process (or the host) delivering it.

A task's end schedules its deliveries itself: the final transition's Lua
call (fleet.state.records) adds one delivery per hook — due now, with a
snapshot of the final record — to keys only workers write. So nothing but a
recorded end is ever delivered, a record rewritten later does not change
what a hook hears, and an end is scheduled once however often anyone says
it happened. A deliverer takes a due delivery by moving its score past the
time a try may take (a lease, so no other host tries it meanwhile) and,
after the try, removes it or makes it due again later. A host that dies
mid-try leaves the delivery to be taken again when that lease runs out:
deliveries are at least once, never lost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from fleet.connection import redis_errors
from fleet.record import TaskRecord
from fleet.state.keys import Keys
from fleet.state.scripts import load_script

SNAPSHOT_LIMIT = 256 * 1024  # bytes of the record a delivery carries


@dataclass(frozen=True)
class Delivery:
    """One hook to tell of one end of a task (the record's revision at that
    end: every end its own, a task cancelled before a retry ran included),
    with the record as it ended; `tries` so far, `since` when it was scheduled."""

    task: str
    revision: int
    hook: str
    record: dict[str, Any]
    tries: int = 0
    since: float = 0.0

    @property
    def id(self) -> str:
        return delivery_id(self.task, self.revision, self.hook)

    def state(self) -> str:
        return json.dumps({"tries": self.tries, "since": self.since, "record": self.record})

    @classmethod
    def parse(cls, member: str, state: str | None) -> Delivery | None:
        """A delivery from its id and stored state; None for what fleet did not write."""
        task, _, rest = member.partition("|")
        revision, _, hook = rest.partition("|")
        try:
            stored = json.loads(state or "")
            return cls(task, int(revision), hook, dict(stored["record"]), int(stored["tries"]),
                       float(stored["since"]))
        except (ValueError, KeyError, TypeError):
            return None


def delivery_id(task_id: str, revision: int, hook: str) -> str:
    """The same for every try: a receiver dedups on it (task ids have no `|`)."""
    return f"{task_id}|{revision}|{hook}"


def snapshot_of(record: TaskRecord) -> dict[str, Any]:
    """The record as a hook hears it; one whose result would make it over
    SNAPSHOT_LIMIT goes without the result (a record can be forged large)."""
    snapshot = record.model_dump(mode="json")
    if len(json.dumps(snapshot)) > SNAPSHOT_LIMIT:
        snapshot.update(result=None, result_omitted=f"over {SNAPSHOT_LIMIT} bytes: see fleet status")
    return snapshot


def schedule(pipe: Pipeline, keys: Keys, record: TaskRecord, hooks: list[str], now: float) -> None:
    """Add a final record's deliveries to a transition's writes (its Lua call)."""
    snapshot = snapshot_of(record)
    for hook in hooks:
        delivery = Delivery(record.id, record.revision, hook, snapshot, 0, now)
        pipe.zadd(keys.on_done_due, {delivery.id: now}, nx=True)
        pipe.hsetnx(keys.on_done_deliveries, delivery.id, delivery.state())


class Deliveries:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._take_due = load_script(client, "take_due")
        self._later = load_script(client, "deliver_later")

    def take_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Deliveries due by `now`, each held for `lease_s` by this caller.
        What does not parse (not fleet's) is dropped."""
        with redis_errors():
            rows: Any = self._take_due([self.keys.on_done_due, self.keys.on_done_deliveries],
                                       [now, now + lease_s, limit])
        taken = []
        for member, state in zip(rows[::2], rows[1::2], strict=True):
            if (delivery := Delivery.parse(member, state)) is not None:
                taken.append(delivery)
            else:
                self.forget(member)
        return taken

    def next_due(self) -> float | None:
        """When the soonest delivery is due (or its try's lease runs out)."""
        with redis_errors():
            soonest: Any = self.redis.zrange(self.keys.on_done_due, 0, 0, withscores=True)
        return float(soonest[0][1]) if soonest else None

    def done(self, delivery: Delivery) -> None:
        """Delivered, or given up on: forget it."""
        self.forget(delivery.id)

    def forget(self, member: str) -> None:
        with redis_errors(), self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.on_done_due, member)
            pipe.hdel(self.keys.on_done_deliveries, member)
            pipe.execute()

    def later(self, delivery: Delivery, at: float) -> None:
        """A failed try: count it, and try again at `at` (unless another
        deliverer finished it meanwhile)."""
        counted = Delivery(delivery.task, delivery.revision, delivery.hook, delivery.record,
                           delivery.tries + 1, delivery.since)
        with redis_errors():
            self._later([self.keys.on_done_due, self.keys.on_done_deliveries],
                        [counted.id, at, counted.state()])
