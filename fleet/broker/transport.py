"""kombu's Redis transport with two changes. A purge does not destroy the
messages it takes off a queue but moves them to `<ns>:purged:<queue>`, where a
consumer of that agent finds them and records their tasks `cancelled`
(`worker.housekeeping`). Without it, a purged task keeps its `queued`
record, and the housekeeper, finding its message gone, would publish it
again: `celery purge` would be silently undone.

`fleet.app` (what `celery -A fleet.app purge` and Flower use) and fleet's
own processes get this transport through `broker_transport`. A publisher's
plain Celery app purges with kombu's own transport: its tasks' messages are
gone for good, and the housekeeper takes them for lost (docs/celery.md).

And a channel reuses one Redis client object for its commands rather than
making one per command (kombu's way): making it was a third of what
publishing a message cost, and publishing a task now also sends Celery's
`task-sent` event. A redis-py client is safe to share between threads (each
command takes a connection from the pool); a new pool gets a new client."""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from fleet.state.keys import Keys

# Move every message of a list to another, atomically; how many moved.
MOVE_ALL = """
local moved = 0
while redis.call('rpoplpush', KEYS[1], KEYS[2]) do moved = moved + 1 end
return moved
"""


def move_purged(channel: Any, queue: str) -> int | None:
    """Move the messages of `queue` (each of its priority lists) to its
    purged list, in one atomic step per list; how many were moved (None:
    the channel's key prefix is not a fleet namespace's)."""
    prefix = channel.global_keyprefix
    keys = Keys.of_broker_prefix(prefix)
    if keys is None:
        return None
    client = redis.Redis(connection_pool=channel.pool)  # full key names: no prefixing client
    purged = keys.purged(queue)
    moved = 0
    for pri in channel.priority_steps:
        moved += int(client.eval(MOVE_ALL, 2, f"{prefix}{channel._q_for_pri(queue, pri)}", purged))  # type: ignore[arg-type]
    return moved


class FleetChannelMixin:
    """What fleet changes in kombu's Redis channels (see the module)."""

    pool: Any
    _shared_client: Any = None

    def _purge(self, queue: str) -> int:
        moved = move_purged(self, queue)
        return super()._purge(queue) if moved is None else moved  # type: ignore[misc]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the poller's own, made once by kombu
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()  # type: ignore[misc]
        return client


class Channel(FleetChannelMixin, kombu_redis.Channel):
    """kombu's Redis channel, changed as the module says."""


class SentinelChannel(FleetChannelMixin, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, changed as the module says."""


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
