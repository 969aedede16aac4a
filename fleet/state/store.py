"""TaskStore: the views of task state over one Redis connection — records
and their transitions, leases, event streams, and listing tasks. A process makes
one and hands the part it needs to each of its components."""

from __future__ import annotations

import redis

from fleet.state.events import EventStreams
from fleet.state.keys import Keys
from fleet.state.leases import Leases
from fleet.state.listing import TaskListing
from fleet.state.records import OnDoneHooks, TaskRecords


class TaskStore:
    def __init__(self, client: redis.Redis, namespace: str, retention_s: int,
                 on_done: OnDoneHooks | None = None) -> None:
        """`on_done`: which hooks a task's end is delivered to (the
        settings' `on_done_hooks`, where hooks are configured)."""
        self.redis = client
        self.keys = Keys(namespace)
        self.records = TaskRecords(client, self.keys, retention_s, on_done)
        self.events = EventStreams(client, self.keys)
        self.leases = Leases(client, self.keys, self.records)
        self.listing = TaskListing(self.records)
