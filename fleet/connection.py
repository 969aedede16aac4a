"""fleet's connection to Redis, and the boundary where redis-py's errors
become fleet's own: every module that talks to Redis calls it through
`redis_errors()`, so callers catch `StateStoreError`, never a redis-py class."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.sentinel import Sentinel

from fleet.errors import StateStoreError
from fleet.redis_url import is_sentinel_url, parse_sentinel_url, redact_credentials
from fleet.settings import FleetSettings


def connect_redis(settings: FleetSettings, **options: Any) -> redis.Redis:
    """fleet's own connection to Redis (records, streams, control). With a
    `sentinel://` redis_url the sentinels name the primary, and name it again
    after a failover; `options` are redis-py's (decode_responses=True by default)."""
    client: redis.Redis = connect(settings, redis.Redis, Sentinel, options)
    return client


def connect_redis_async(settings: FleetSettings, **options: Any) -> redis.asyncio.Redis:
    """The same connection for asyncio (redis.asyncio)."""
    import redis.asyncio
    import redis.asyncio.sentinel

    client: redis.asyncio.Redis = connect(settings, redis.asyncio.Redis, redis.asyncio.sentinel.Sentinel,
                                          options)
    return client


def connect(settings: FleetSettings, client_class: Any, sentinel_class: Any, options: dict[str, Any]) -> Any:
    url = settings.redis_url
    options = {"decode_responses": True, "health_check_interval": 30, **settings.redis_tls, **options}
    if not is_sentinel_url(url):
        return client_class.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinels = sentinel_class(list(parsed.nodes), sentinel_kwargs={**sentinel_options,
                                                                    **settings.sentinel_kwargs},
                               **sentinel_options)
    return sentinels.master_for(settings.redis_sentinel_master, db=parsed.db, username=parsed.username,
                                password=parsed.password, **options)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis failures as fleet's own one-line error."""
    try:
        yield
    except redis.RedisError as error:
        raise StateStoreError(f"Redis: {redact_credentials(str(error))}") from None
