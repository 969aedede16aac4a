"""AsyncFleetClient: FleetClient's methods for asyncio code (the publisher
process). Following tasks — `as_completed`, `wait_many`, `wait`, `status`
— runs on redis.asyncio: any number of tasks are waited on by one
coroutine over one connection, and the event loop is never blocked.

The short writes (`submit`, `cancel`, `retry`, `cancel_many`) and listing
(`tasks`, `tasks_page`) run FleetClient's own code in a worker thread
(`asyncio.to_thread`): publishing goes through Celery/kombu, which have no
asyncio API, and one code path for every write keeps the rules (checks,
signing, idempotency) in one place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import redis.asyncio

from fleet.client import FleetClient
from fleet.connection import connect_redis_async, redis_errors
from fleet.record import State, TaskRecord
from fleet.settings import FleetSettings, load_settings
from fleet.state.completion import Completion
from fleet.state.events import arrived_events, newest_ids
from fleet.state.listing import Page
from fleet.state.records import READ_FIELDS, every_record, readable_record


class AsyncFleetClient:
    def __init__(self, settings: FleetSettings, redis_client: redis.asyncio.Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis_client or connect_redis_async(settings)
        self.sync = FleetClient(settings)
        self.keys = self.sync.store.keys

    @classmethod
    def from_settings(cls, **overrides: Any) -> AsyncFleetClient:
        return cls(load_settings(**overrides))

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.redis.aclose()
        self.sync.store.redis.close()

    # -- following tasks (redis.asyncio) ---------------------------------------

    async def status(self, task_id: str) -> TaskRecord:
        return (await self.many([task_id]))[0]

    async def many(self, task_ids: list[str]) -> list[TaskRecord]:
        """The records of these tasks, in one round trip; TaskNotFound for the first missing."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hmget(self.keys.task(task_id), READ_FIELDS)
                rows = await pipe.execute(raise_on_error=False)
        return every_record(task_ids, [readable_record(values, task_id)
                                       for task_id, values in zip(task_ids, rows, strict=True)])

    async def as_completed(self, task_ids: Iterable[str],
                           timeout: float | None = None) -> AsyncIterator[TaskRecord]:
        """Each task's final record as it ends, the first to end first (as
        FleetClient.as_completed: one blocking read of every stream at a time)."""
        ids = list(dict.fromkeys(task_ids))
        completion = Completion(ids, await self.last_ids(ids), timeout)
        while True:
            for record in completion.ended(await self.many(completion.to_read)):
                yield record
            if completion.done:
                return
            streams: dict[Any, Any] = {self.keys.events(i): c for i, c in completion.cursors.items()}
            with redis_errors():
                reply = await self.redis.xread(streams, block=completion.block_ms())
            completion.arrived(arrived_events(self.keys, completion.cursors, reply))

    async def last_ids(self, task_ids: list[str]) -> dict[str, str]:
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.xrevrange(self.keys.events(task_id), "+", "-", 1)
                rows = await pipe.execute()
        return newest_ids(task_ids, rows)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Until the task is final; its record."""
        async for record in self.as_completed([task_id], timeout):
            return record
        raise AssertionError("as_completed ended before its task")  # it yields each or raises

    async def wait_many(self, task_ids: Iterable[str], timeout: float | None = None) -> list[TaskRecord]:
        """Until every task is final; their records, in the order given."""
        ids = list(task_ids)
        done = {record.id: record async for record in self.as_completed(ids, timeout)}
        return [done[task_id] for task_id in ids]

    # -- writes and listing (FleetClient's code, in a thread) -------------------

    async def submit(self, agent: str, payload: dict[str, Any], **options: Any) -> str:
        """As FleetClient.submit (key, host, eta, countdown, priority, on_done)."""
        return await asyncio.to_thread(self.sync.submit, agent, payload, **options)

    async def cancel(self, task_id: str) -> TaskRecord:
        return await asyncio.to_thread(self.sync.cancel, task_id)

    async def retry(self, task_id: str) -> TaskRecord:
        return await asyncio.to_thread(self.sync.retry, task_id)

    async def cancel_many(self, agent: str | None = None, state: State | str | None = None) -> list[str]:
        return await asyncio.to_thread(self.sync.cancel_many, agent, state)

    async def tasks(self, agent: str | None = None, state: State | str | None = None,
                    limit: int = 1000, **filters: Any) -> list[TaskRecord]:
        """As FleetClient.tasks (host, key, since)."""
        return await asyncio.to_thread(self.sync.tasks, agent, state, limit, **filters)

    async def tasks_page(self, agent: str | None = None, state: State | str | None = None,
                         limit: int = 1000, **filters: Any) -> Page:
        """As FleetClient.tasks_page (host, key, since, cursor)."""
        return await asyncio.to_thread(self.sync.tasks_page, agent, state, limit, **filters)
