"""The deliveries of on_done hooks, kept in Redis so that none is lost with
the process (or the host) delivering it.

A task's end is an entry of the fleet-wide changes stream, written with the
record's change. Every host's deliverer reads that stream in one consumer
group: each entry reaches one of them, which turns the end into one
delivery per hook ("<change>|<task>|<hook>" in a sorted set scored by when it
is due) and acknowledges the entry, in one transaction. A deliverer takes a
due delivery by moving its score past the time a try may take (a lease, so
no other host tries it meanwhile) and, after the try, removes it or makes it
due again later. A host that dies mid-try leaves the delivery to be taken
again when that lease runs out: deliveries are at least once, never lost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.state.keys import Keys
from fleet.state.scripts import load_script

GROUP = "on-done"
STALE_AFTER_MS = 60_000  # an entry read but not acknowledged this long: its reader died


@dataclass(frozen=True)
class Change:
    """One entry of the changes stream."""

    id: str
    task: str
    agent: str
    state: str


@dataclass(frozen=True)
class Delivery:
    """One hook to tell of one task's end; `tries` so far, `since` when it was first due."""

    change: str
    task: str
    hook: str
    tries: int
    since: float

    @property
    def id(self) -> str:
        return f"{self.change}|{self.task}|{self.hook}"

    @classmethod
    def parse(cls, member: str, tries: str | None) -> Delivery | None:
        parts = member.split("|")
        if len(parts) != 3:
            return None
        count, _, since = (tries or "0 0").partition(" ")
        try:
            return cls(parts[0], parts[1], parts[2], tries=int(count), since=float(since))
        except ValueError:
            return None


class Deliveries:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._take_due = load_script(client, "take_due")

    def join(self) -> None:
        """Create the consumer group if there is none: it starts at the
        stream's end (tasks that ended before any hook was configured are
        not delivered)."""
        with redis_errors():
            try:
                self.redis.xgroup_create(self.keys.changes, GROUP, id="$", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def changes(self, consumer: str, block_ms: int, count: int = 200) -> list[Change]:
        """Changes no deliverer has taken: first those read by a deliverer
        that did not acknowledge them within STALE_AFTER_MS (it died), then
        new ones, waiting up to `block_ms` for one."""
        with redis_errors():
            stale: Any = self.redis.xautoclaim(self.keys.changes, GROUP, consumer, STALE_AFTER_MS,
                                               count=count)
            entries = list(stale[1]) if stale else []
            if not entries:
                reply: Any = self.redis.xreadgroup(GROUP, consumer, {self.keys.changes: ">"},
                                                   count=count, block=block_ms)
                entries = [entry for _, batch in reply or [] for entry in batch]
        return [Change(entry_id, fields.get("task", ""), fields.get("agent", ""), fields.get("state", ""))
                for entry_id, fields in entries if fields]  # a trimmed entry comes back empty

    def schedule(self, change: Change, hooks: list[str], now: float) -> None:
        """Turn a change into a delivery per hook, due now, and acknowledge
        it: one transaction. Scheduling one twice changes nothing."""
        with redis_errors(), self.redis.pipeline(transaction=True) as pipe:
            for hook in hooks:
                delivery = Delivery(change.id, change.task, hook, 0, now)
                pipe.zadd(self.keys.on_done_due, {delivery.id: now}, nx=True)
                pipe.hsetnx(self.keys.on_done_tries, delivery.id, f"0 {now}")
            pipe.xack(self.keys.changes, GROUP, change.id)
            pipe.execute()

    def take_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Deliveries due by `now`, each held for `lease_s` by this caller."""
        with redis_errors():
            rows: Any = self._take_due([self.keys.on_done_due, self.keys.on_done_tries],
                                       [now, now + lease_s, limit])
        taken = [Delivery.parse(member, tries) for member, tries in zip(rows[::2], rows[1::2], strict=True)]
        return [delivery for delivery in taken if delivery is not None]

    def next_due(self) -> float | None:
        """When the soonest delivery is due (or its try's lease runs out)."""
        with redis_errors():
            soonest: Any = self.redis.zrange(self.keys.on_done_due, 0, 0, withscores=True)
        return float(soonest[0][1]) if soonest else None

    def done(self, delivery: Delivery) -> None:
        """Delivered, or given up on: forget it."""
        self._both(lambda pipe: (pipe.zrem(self.keys.on_done_due, delivery.id),
                                 pipe.hdel(self.keys.on_done_tries, delivery.id)))

    def later(self, delivery: Delivery, at: float) -> None:
        """A failed try: count it, and try again at `at`."""
        self._both(lambda pipe: (
            pipe.zadd(self.keys.on_done_due, {delivery.id: at}, xx=True),
            pipe.hset(self.keys.on_done_tries, delivery.id, f"{delivery.tries + 1} {delivery.since}")))

    def _both(self, writes: Callable[[Any], Any]) -> None:
        with redis_errors(), self.redis.pipeline(transaction=True) as pipe:
            writes(pipe)
            pipe.execute()
