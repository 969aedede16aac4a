"""Reading kombu's Redis layout (fleet/broker/queues.py): `waiting_messages`
and `published_task_ids`, over messages Celery itself published and kombu
itself delivered, into a fakeredis server (kombu's Redis transport pointed at
it through its `connection_class`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import kombu.pools
import kombu.transport.redis
import pytest
from celery import Celery

from fleet.broker.celery_app import make_celery
from fleet.broker.publish import publish
from fleet.broker.queues import published_task_ids, waiting_messages
from fleet.broker.routing import queue_name
from fleet.settings import AgentSpec, FleetSettings
from fleet.state.keys import Keys

NS = "ns"
KEYS = Keys(NS)
DEV = queue_name(NS, "dev", None)
DEV_H1 = queue_name(NS, "dev", "h1")
BOSS = queue_name(NS, "boss", None)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> fakeredis.FakeServer:
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "absent.toml"))
    fake = fakeredis.FakeServer()

    class Connection(fakeredis.FakeRedisConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "server": fake})

    monkeypatch.setattr(kombu.transport.redis.Channel, "connection_class", Connection)
    return fake


@pytest.fixture
def redis(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server, decode_responses=True)


@pytest.fixture
def settings(server: fakeredis.FakeServer) -> FleetSettings:
    return FleetSettings(agents={"dev": AgentSpec(), "boss": AgentSpec()}, namespace=NS,
                         redis_url="redis://fakeredis:6379/0")


@pytest.fixture
def app(settings: FleetSettings) -> Iterator[Celery]:
    # kombu keeps producer pools process-wide, keyed by the broker URL: one
    # made in another test would still talk to that test's fake server.
    kombu.pools.reset()
    made = make_celery(settings)
    yield made
    made.close()
    kombu.pools.reset()


def test_nothing_published(redis: fakeredis.FakeRedis) -> None:
    assert waiting_messages(redis, KEYS, [DEV, DEV_H1]) == 0
    assert published_task_ids(redis, KEYS, [DEV, DEV_H1]) == set()


def test_waiting_messages_counts_the_named_queues(redis: fakeredis.FakeRedis, app: Celery,
                                                  settings: FleetSettings) -> None:
    publish(app, settings, "t1", "dev")
    publish(app, settings, "t2", "dev", attempt=2, countdown=30)  # a delayed retry waits there too
    publish(app, settings, "t3", "dev", host="h1")
    publish(app, settings, "t4", "boss")
    assert redis.llen(KEYS.queue(f"{DEV}\x06\x163")) == 2  # kombu's list for "normal", under the prefix
    assert waiting_messages(redis, KEYS, [DEV]) == 2
    assert waiting_messages(redis, KEYS, [DEV, DEV_H1]) == 3
    assert waiting_messages(redis, KEYS, [BOSS]) == 1


def test_every_priority_list_of_a_queue_is_read(redis: fakeredis.FakeRedis, app: Celery,
                                               settings: FleetSettings) -> None:
    for n, priority in enumerate((0, 3, 6, 9, 4)):
        publish(app, settings, f"p{n}", "dev", priority=priority)
    assert redis.llen(KEYS.queue(DEV)) == 1  # kombu puts the others in lists of their own
    assert waiting_messages(redis, KEYS, [DEV]) == 5
    assert published_task_ids(redis, KEYS, [DEV]) == {f"p{n}" for n in range(5)}


def test_published_task_ids_reads_queued_and_delivered_messages(
        redis: fakeredis.FakeRedis, app: Celery, settings: FleetSettings) -> None:
    publish(app, settings, "t1", "dev")
    publish(app, settings, "t2", "dev")
    publish(app, settings, "t3", "dev", host="h1")
    publish(app, settings, "t4", "boss")
    assert published_task_ids(redis, KEYS, [DEV, DEV_H1]) == {"t1", "t2", "t3"}
    with app.connection_for_read() as connection:
        # A consumer takes t1 and has not acknowledged it: kombu moves it
        # from the list into the `unacked` hash.
        delivered = connection.default_channel.basic_get(DEV, no_ack=False)
        assert delivered.headers["id"] == "t1"
        assert redis.hlen(KEYS.unacked) == 1
        assert waiting_messages(redis, KEYS, [DEV]) == 1
        assert published_task_ids(redis, KEYS, [DEV]) == {"t1", "t2"}
        assert published_task_ids(redis, KEYS, [BOSS]) == {"t1", "t4"}  # unacked: of any queue
        delivered.ack()
        assert published_task_ids(redis, KEYS, [DEV]) == {"t2"}


def test_what_fleet_did_not_write_in_the_queues_is_skipped_not_fatal(redis: fakeredis.FakeRedis) -> None:
    """Found in review: one malformed entry in kombu's unacked hash crashed the housekeeper."""
    keys = Keys("fleet")
    redis.hset(keys.unacked, mapping={"garbage": "garbage", "short": "[]"})
    redis.rpush(keys.queue("fleet.agent.dev"), "not json", json.dumps({"headers": {"id": "t1"}}))
    assert published_task_ids(redis, keys, ["fleet.agent.dev"]) == {"t1"}
