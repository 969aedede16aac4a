"""Reading kombu's Redis layout directly: how many messages wait in a queue,
and which tasks have a message waiting or delivered. One list per queue and
one `unacked` hash for every delivered, unacknowledged message (kombu's
Redis transport, under fleet's key prefix). No Celery import: the CLI and
the housekeeper read these without it."""

from __future__ import annotations

import json
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.state.keys import Keys


def waiting_messages(client: redis.Redis, keys: Keys, queues: list[str]) -> int:
    """How many messages wait in these queues (kombu's Redis lists)."""
    with redis_errors(), client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(keys.queue(queue))
        return sum(int(n) for n in pipe.execute())


def published_task_ids(client: redis.Redis, keys: Keys, queues: list[str]) -> set[str]:
    """The ids of the tasks whose messages wait in these queues or have been
    delivered and not yet acknowledged (kombu's Redis layout: a list per
    queue, one `unacked` hash for all)."""
    with redis_errors(), client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.lrange(keys.queue(queue), 0, -1)
        pipe.hvals(keys.unacked)
        *waiting, delivered = pipe.execute()
    messages = [decoded(raw) for batch in waiting for raw in batch]
    messages += [entry[0] if isinstance(entry := decoded(raw), list) and entry else None
                 for raw in delivered]  # [message, exchange, routing key]
    return {str(m.get("headers", {}).get("id")) for m in messages if isinstance(m, dict)}


def decoded(raw: str) -> Any:
    """A message as JSON; None for anything else (nothing fleet wrote: skipped, not fatal)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None
