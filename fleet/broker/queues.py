"""Reading kombu's Redis layout directly: how many messages wait in a queue,
and which tasks have a message waiting or delivered. One list per queue and
priority step, and one `unacked` hash for every delivered, unacknowledged message (kombu's
Redis transport, under fleet's key prefix). No Celery import: the CLI and
the housekeeper read these without it."""

from __future__ import annotations

import json
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.state.keys import Keys

# kombu's Redis transport keeps a queue's messages in one list per priority
# step (its defaults, which fleet keeps): the base list for 0, `<queue>\x06\x16<step>`
# for the others. Every reader here reads all of them.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEPARATOR = "\x06\x16"


def priority_lists(keys: Keys, queue: str) -> list[str]:
    """The Redis lists of a queue's messages, highest priority first."""
    return [keys.queue(queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}")
            for step in PRIORITY_STEPS]


def waiting_messages(client: redis.Redis, keys: Keys, queues: list[str]) -> int:
    """How many messages wait in these queues (kombu's Redis lists)."""
    with redis_errors(), client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in priority_lists(keys, queue):
                pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


def published_task_ids(client: redis.Redis, keys: Keys, queues: list[str],
                       delivered_after: float | None = None) -> set[str]:
    """The ids of the tasks whose messages wait in these queues or have been
    delivered and not yet acknowledged (kombu's Redis layout: a list per
    queue, one `unacked` hash for all, and `unacked_index` scored by when
    each was delivered). With `delivered_after` (epoch seconds), a message
    delivered before then counts as not delivered: its consumer was cut off
    with it, and it would come back only after the visibility timeout."""
    with redis_errors(), client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in priority_lists(keys, queue):
                pipe.lrange(key, 0, -1)
            pipe.lrange(keys.purged(queue), 0, -1)  # until their tasks are recorded cancelled
        pipe.hgetall(keys.unacked)
        pipe.zrangebyscore(keys.unacked_index, "-inf" if delivered_after is None else delivered_after, "+inf")
        *waiting, delivered, recent_tags = pipe.execute()
    recent = set(recent_tags)
    messages = [decoded(raw) for batch in waiting for raw in batch]
    messages += [entry[0] if isinstance(entry := decoded(raw), list) and entry else None
                 for tag, raw in delivered.items()  # [message, exchange, routing key]
                 if delivered_after is None or tag in recent]
    return {task_id for m in messages if (task_id := task_id_of(m)) is not None}


def task_id_of(message: Any) -> str | None:
    """The Celery task id a message (decoded) carries in its headers."""
    headers = message.get("headers") if isinstance(message, dict) else None
    return str(headers.get("id")) if isinstance(headers, dict) and "id" in headers else None


PURGED_BATCH = 100


def purged_messages(client: redis.Redis, keys: Keys, queue: str) -> list[tuple[str, str | None]]:
    """Messages `celery purge` took off `queue` (fleet.broker.transport), up
    to a batch: each as stored and the task id it carries."""
    key = keys.purged(queue)
    with redis_errors():
        try:
            batch = client.lrange(key, 0, PURGED_BATCH - 1)
        except redis.ResponseError:  # not a list: nothing kombu or fleet wrote
            client.delete(key)
            return []
    return [(raw, task_id_of(decoded(raw))) for raw in batch]  # type: ignore[union-attr]


def forget_purged(client: redis.Redis, keys: Keys, queue: str, raw: str) -> None:
    """A purged message whose task has been dealt with."""
    with redis_errors():
        client.lrem(keys.purged(queue), 1, raw)


def decoded(raw: str) -> Any:
    """A message as JSON; None for anything else (nothing fleet wrote: skipped, not fatal)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON; nested past the parser's depth
        return None
