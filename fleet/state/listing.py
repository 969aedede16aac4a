"""Listing tasks: every filter at once (agent, state, host, idempotency key,
created since), a page at a time, in one stable order.

The order is an index's: with a state, the state's index (when each task
entered it); otherwise the agents' indexes (when each was created), merged.
Newest first; among equal times, by id. A page ends with a cursor, the
(time, id) of its last task: the next page is what comes after it in that
order, so tasks created meanwhile do not shift the pages. The index is read
a chunk at a time and filtered record by record, so no match is missed
however many tasks others have; index entries whose record has expired are
pruned on the way."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet.connection import redis_errors
from fleet.record import State, TaskRecord
from fleet.state.records import TaskRecords

CHUNK = 1000  # index entries read (and records fetched) at a time


@dataclass(frozen=True)
class Filters:
    agent: str | None = None
    state: State | None = None
    host: str | None = None  # where it ran or runs, or the host it is pinned to
    since: float | None = None  # created at or after (epoch seconds)

    def match(self, record: TaskRecord) -> bool:
        return (self.agent in (None, record.agent) and self.state in (None, record.state)
                and self.host in (None, record.host, record.pinned_host)
                and (self.since is None or created(record) >= self.since))


def created(record: TaskRecord) -> float:
    """When the record says it was created (epoch seconds; -inf for a time
    that does not parse: whoever may write records cannot break a listing)."""
    try:
        return datetime.fromisoformat(record.created_at).timestamp()
    except (ValueError, TypeError):
        return -math.inf


@dataclass(frozen=True)
class Page:
    records: list[TaskRecord]
    cursor: str | None  # give it back for the next page; None: this was the last


class BadCursor(ValueError):
    """A cursor fleet did not give: the caller's to fix (a usage error)."""


def parse_cursor(cursor: str) -> tuple[float, str]:
    """`<time>:<id>` → (time, id); BadCursor for anything else."""
    score, sep, task_id = cursor.partition(":")
    try:
        time = float(score)
    except ValueError:
        time = math.nan
    if not sep or not task_id or not math.isfinite(time):
        raise BadCursor(f"{cursor!r} is not a cursor fleet gave")
    return time, task_id


class TaskListing:
    def __init__(self, records: TaskRecords) -> None:
        self.records = records
        self.redis = records.redis
        self.keys = records.keys

    def page(self, filters: Filters, limit: int, cursor: str | None = None) -> Page:
        """Up to `limit` matching tasks after `cursor` (from the newest
        without one), and the cursor of the next page."""
        after = parse_cursor(cursor) if cursor else None
        found: list[tuple[TaskRecord, float]] = []
        entries = self._entries(self._indexes(filters), after, filters.since)
        while True:
            chunk = [entry for _, entry in zip(range(CHUNK), entries, strict=False)]
            records = self.records.maybe_many([task_id for task_id, _, _ in chunk])
            for n, ((task_id, score, index), record) in enumerate(zip(chunk, records, strict=True)):
                if record is None:
                    self._prune(task_id, index)
                elif filters.match(record):
                    found.append((record, score))
                    if len(found) == limit:  # a cursor if anything follows (it may not match)
                        more = n + 1 < len(chunk) or next(entries, None) is not None
                        return Page([r for r, _ in found], f"{score!r}:{record.id}" if more else None)
            if len(chunk) < CHUNK:
                return Page([r for r, _ in found], None)

    def find(self, filters: Filters, limit: int = 1000) -> list[TaskRecord]:
        """The first page's tasks."""
        return self.page(filters, limit).records

    def by_key(self, key: str, filters: Filters) -> list[TaskRecord]:
        """The task an idempotency key names, if it matches the filters."""
        with redis_errors():
            task_id = self.redis.get(self.keys.idempotency(key))
        if task_id is None:
            return []
        record = self.records.maybe_many([str(task_id)])[0]
        return [record] if record is not None and filters.match(record) else []

    def _indexes(self, filters: Filters) -> list[str]:
        if filters.state is not None:
            return [self.keys.by_state(filters.state)]
        if filters.agent is not None:
            return [self.keys.by_agent(filters.agent)]
        with redis_errors():
            return sorted(str(key) for key in self.redis.scan_iter(match=self.keys.by_agent("*"), count=1000,
                                                                   _type="zset"))

    def _entries(self, indexes: list[str], after: tuple[float, str] | None,
                 since: float | None) -> Iterator[tuple[str, float, str]]:
        """(id, time, index) of every entry after `after`, newest first, the
        indexes merged. A task enters any index at or after its creation, so
        `since` bounds every one of them."""
        streams = [self._index_entries(index, after, since) for index in indexes]
        return heapq.merge(*streams, key=lambda entry: (entry[1], entry[0]), reverse=True)

    def _index_entries(self, index: str, after: tuple[float, str] | None,
                       since: float | None) -> Iterator[tuple[str, float, str]]:
        bottom: Any = "-inf" if since is None else since
        bound, skip = after, 0  # read from the last entry seen, not by offset: pruning shifts offsets
        while True:
            with redis_errors():
                rows: Any = self.redis.zrevrangebyscore(index, "+inf" if bound is None else bound[0], bottom,
                                                        start=skip, num=CHUNK, withscores=True)
            fresh = [(float(score), str(task_id)) for task_id, score in rows
                     if bound is None or (score, task_id) < bound]  # ties: ids after the bound's only
            for score, task_id in fresh:
                yield task_id, score, index
            if len(rows) < CHUNK:
                return
            bound, skip = (fresh[-1], 0) if fresh else (bound, skip + CHUNK)  # a chunk all of one time

    def _prune(self, task_id: str, index: str) -> None:
        """Drop an expired task from the indexes (its agent's index is trimmed
        by age when tasks finish)."""
        with redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(index, task_id)
            for state in State:
                pipe.zrem(self.keys.by_state(state), task_id)
            pipe.execute()
