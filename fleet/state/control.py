"""The control channel: notices fleet's processes send each other through
Redis pub/sub, formatted and parsed here only.

    cancel <task id>     a task was cancelled: whoever runs it ends it now
    paused <agent>       the agent's breaker opened: its consumers stop taking tasks
    resumed <agent>      the breaker closed: they take tasks again
    drain <host>         the host stops taking tasks
    undrain <host>       it takes tasks again
    freed <agent>        a run of the agent ended: its consumers held back at max_running look again

A notice only makes a change take effect sooner: the truth is in the flags
and records, which the housekeeper re-reads anyway (a subscriber that is
reconnecting misses notices)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import redis

from fleet.connection import redis_errors
from fleet.errors import StaleTransition, TaskNotFound
from fleet.record import ErrorKind, State, TaskError, TaskRecord, now_iso
from fleet.state.keys import Keys

if TYPE_CHECKING:
    from fleet.state.store import TaskStore


class Notice(StrEnum):
    CANCEL = "cancel"
    PAUSED = "paused"
    RESUMED = "resumed"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    FREED = "freed"


@dataclass(frozen=True)
class ControlMessage:
    notice: Notice
    subject: str  # a task id, an agent or a host, by the notice

    def encode(self) -> str:
        return f"{self.notice} {self.subject}"

    @classmethod
    def parse(cls, data: str) -> ControlMessage | None:
        """The message, or None for anything that is not one (ignored)."""
        verb, _, subject = data.partition(" ")
        try:
            notice = Notice(verb)
        except ValueError:
            return None
        return cls(notice, subject) if subject and " " not in subject else None


class ControlSubscription:
    """Listening to the control channel; Redis errors as StateStoreError."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        with redis_errors():
            self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            self._pubsub.subscribe(keys.control)

    def receive(self, timeout: float) -> str | None:
        """The next message's text, or None if none came within `timeout` seconds."""
        with redis_errors():
            message = self._pubsub.get_message(timeout=timeout)
        return None if message is None else str(message["data"])

    def close(self) -> None:
        with redis_errors():
            self._pubsub.close()


def announce(client: redis.Redis, keys: Keys, notice: Notice, subject: str) -> None:
    """Send a notice to every process of the fleet that listens."""
    with redis_errors():
        client.publish(keys.control, ControlMessage(notice, subject).encode())


def cancel(store: TaskStore, task_id: str, why: str) -> TaskRecord:
    """Cancel a queued, retrying or running task (the record says so first,
    then a notice tells whoever runs it to end it now; its housekeeper
    would notice the record within a lease period anyway). A finished task
    is returned unchanged."""
    record = store.records.get(task_id)
    if record.state.final:
        return record
    try:
        cancelled = store.records.transition(task_id, State.CANCELLED, finished_at=now_iso(),
                                             error=TaskError(kind=ErrorKind.CANCELLED, message=why))
    except StaleTransition:  # it finished meanwhile
        return store.records.get(task_id)
    announce(store.redis, store.keys, Notice.CANCEL, task_id)
    return cancelled


def revoke(store: TaskStore, task_id: str, why: str) -> str:
    """`celery control revoke`: cancel the task; an id with no record yet (a
    publisher's message no consumer has taken) is marked finished instead,
    so that no message starts it later. What was done, for the log."""
    try:
        return str(cancel(store, task_id, why).state)
    except TaskNotFound:
        store.records.forbid(task_id)
        return "no record yet: its id is marked finished, nothing will start it"
