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
    url = settings.redis_url
    options = {"decode_responses": True, "health_check_interval": 30, **settings.redis_tls, **options}
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinels = Sentinel(list(parsed.nodes), sentinel_kwargs={**sentinel_options, **settings.sentinel_kwargs},
                         **sentinel_options)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, db=parsed.db, username=parsed.username,
        password=parsed.password, **options)
    return client


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis failures as fleet's own one-line error."""
    try:
        yield
    except redis.RedisError as error:
        raise StateStoreError(f"Redis: {redact_credentials(str(error))}") from None
