"""Event streams in Redis: a task's state transitions and output chunks, and
the alerts stream. Reading goes through one generator, `follow`, which every
reader (the CLI's logs and alerts, the client's wait, the housekeeper)
shares; writing an attempt's output or events is fenced by its attempt."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.errors import StaleTransition
from fleet.state.keys import Keys
from fleet.state.scripts import load_script

EVENTS_MAXLEN = 20_000
BLOCK_MS = 5000  # how long one blocking read waits before it reports an empty batch


@dataclass(frozen=True)
class Event:
    id: str
    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("type", "")

    @property
    def at(self) -> datetime | None:
        """When Redis stored it (its id's milliseconds); None for an id no clock made."""
        try:
            return datetime.fromtimestamp(int(self.id.partition("-")[0]) / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            return None


class EventStreams:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._fenced_xadd = load_script(client, "fenced_xadd")

    # -- reading -------------------------------------------------------------

    def read(self, key: str, after: str = "0-0", block_ms: int | None = None,
             count: int = 1000) -> list[Event]:
        """Events of stream `key` after the id `after`; with block_ms, waits that long for one."""
        with redis_errors():
            if block_ms is None:
                start = "-" if after == "0-0" else f"({after}"
                rows: Any = self.redis.xrange(key, start, "+", count)
                return [Event(i, f) for i, f in rows]
            reply: Any = self.redis.xread({key: after}, count=count, block=block_ms)
        return [Event(i, f) for _, entries in reply or [] for i, f in entries]

    def follow(self, key: str, after: str = "0-0", *, block_ms: int | None = None,
               deadline: float | None = None) -> Iterator[list[Event]]:
        """Batches of events of stream `key` after `after`, oldest first.

        Without `block_ms` it ends once the stream is read to its end. With
        it, it goes on: each batch is what arrived within `block_ms` (empty
        when nothing did, so the caller can look at its own reason to stop),
        until the monotonic `deadline` if one is given."""
        cursor = after
        while True:
            block = block_ms
            if block is not None and deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                block = max(1, min(block, int(remaining * 1000)))
            batch = self.read(key, cursor, block)
            if batch:
                cursor = batch[-1].id
            elif block_ms is None:
                return
            yield batch

    def of_task(self, task_id: str, after: str = "0-0") -> list[Event]:
        """Every event of a task recorded so far (after `after`), oldest first."""
        return [e for batch in self.follow(self.keys.events(task_id), after) for e in batch]

    def output(self, task_id: str) -> Iterator[Event]:
        """All output events recorded so far, oldest first."""
        for batch in self.follow(self.keys.events(task_id)):
            yield from (event for event in batch if event.type == "output")

    def wait_any(self, cursors: dict[str, str], block_ms: int) -> dict[str, list[Event]]:
        """Block until any of these tasks (id → last event id seen) has a new
        event, or block_ms passes: one read of all their streams, on one
        connection. Advances the cursors; the new events by task id."""
        streams: dict[Any, Any] = {self.keys.events(i): c for i, c in cursors.items()}
        with redis_errors():
            reply: Any = self.redis.xread(streams, block=block_ms)
        return arrived_events(self.keys, cursors, reply)

    def newest_id(self, key: str) -> str:
        """The id of stream `key`'s newest entry ("0-0" for none): a cursor
        that follows only what comes after now."""
        with redis_errors():
            row: Any = self.redis.xrevrange(key, "+", "-", 1)
        return str(row[0][0]) if row else "0-0"

    def last_ids(self, task_ids: list[str]) -> dict[str, str]:
        """The id of each task's newest event ("0-0" for none), in one round
        trip: the cursors `wait_any` takes."""
        with redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.xrevrange(self.keys.events(task_id), "+", "-", 1)
            rows: Any = pipe.execute()
        return newest_ids(task_ids, rows)

    # -- writing -------------------------------------------------------------

    def append_output(self, task_id: str, epoch: int, stream: str, data: str) -> None:
        """Record output of attempt `epoch`; StaleTransition if the task has moved on."""
        self._append(task_id, epoch, {"type": "output", "stream": stream, "data": data})

    def add(self, task_id: str, kind: str, epoch: int | None = None, **fields: str) -> None:
        """Record an event; with `epoch`, only while the task is on that
        attempt (StaleTransition otherwise)."""
        entry: dict[str, str] = {"type": kind, **fields}
        if epoch is not None:
            self._append(task_id, epoch, entry)
            return
        with redis_errors():
            self.redis.xadd(self.keys.events(task_id), entry,  # type: ignore[arg-type]
                            maxlen=EVENTS_MAXLEN, approximate=True)

    def _append(self, task_id: str, epoch: int, entry: dict[str, str]) -> None:
        flat = [part for pair in entry.items() for part in pair]
        with redis_errors():
            refused = self._fenced_xadd([self.keys.task(task_id), self.keys.events(task_id)],
                                        [json.dumps(epoch), EVENTS_MAXLEN, *flat])
        if refused is not None:
            raise StaleTransition(f"task {task_id} is {refused}; a write of attempt {epoch} is stale")


def arrived_events(keys: Keys, cursors: dict[str, str], reply: Any) -> dict[str, list[Event]]:
    """An XREAD of tasks' streams (`wait_any`, and the asyncio client's):
    the new events by task id, the cursors advanced past them."""
    by_key = {keys.events(i): i for i in cursors}
    arrived = {}
    for key, entries in reply or []:
        cursors[by_key[key]] = entries[-1][0]
        arrived[by_key[key]] = [Event(i, f) for i, f in entries]
    return arrived


def newest_ids(task_ids: list[str], rows: list[Any]) -> dict[str, str]:
    """Each task's newest event id from an XREVRANGE … COUNT 1 of its stream ("0-0": none)."""
    return {task_id: str(row[0][0]) if row else "0-0" for task_id, row in zip(task_ids, rows, strict=True)}
