"""Redis high availability: with a sentinel:// redis_url, fleet's state and its
broker both follow a failover. Real processes: a primary, one replica and one
sentinel; the primary is SIGKILLed while tasks wait in the queue, the sentinel
promotes the replica, and every task still ends succeeded."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel
from support import MakeFleet, RedisServer, start_redis, start_sentinel

from fleet.broker.celery_app import make_celery
from fleet.broker.queues import priority_lists
from fleet.broker.routing import queue_name
from fleet.record import State

MASTER = "mymaster"
TASKS = 12


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition` holds; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except redis.RedisError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"waited {timeout} s for {what}")


def repl_offset(client: redis.Redis) -> int:
    return int(client.info("replication")["master_repl_offset"])  # type: ignore[index]


def master_port(sentinel: Sentinel) -> int:
    _, port = sentinel.discover_master(MASTER)  # type: ignore[no-untyped-call]
    return int(port)


def replica_known(sentinel: redis.Redis, port: int) -> bool:
    replicas = sentinel.sentinel_slaves(MASTER)
    return any(r["port"] == port and r["is_slave"] and not (r["is_sdown"] or r["is_odown"])
               for r in replicas)  # type: ignore[union-attr]


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    """Primary, replica and sentinel; yielded once the sentinel knows the replica."""
    started: list[RedisServer] = []
    try:
        primary = start_redis(tmp_path / "primary")
        started.append(primary)
        replica = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
        started.append(replica)
        wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up",
                   20, "the replica to sync")
        sentinel = start_sentinel(tmp_path / "sentinel", primary.port, MASTER)
        started.append(sentinel)
        wait_until(lambda: replica_known(redis.Redis(port=sentinel.port), replica.port), 20,
                   "the sentinel to know the replica")
        yield primary, replica, sentinel
    finally:
        for server in reversed(started):
            if server.process.poll() is None:
                server.process.terminate()
                server.process.wait(timeout=10)


def test_the_broker_takes_the_master_name_from_the_settings(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}}, redis_url="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2",
                       redis_sentinel_master="fleet-primary")
    options = make_celery(fleet.settings).conf.broker_transport_options
    assert options["master_name"] == "fleet-primary"
    assert options["global_keyprefix"] == f"{fleet.settings.namespace}:broker:"


def test_queued_tasks_survive_the_loss_of_the_primary(
        redis_ha: tuple[RedisServer, RedisServer, RedisServer], make_fleet: MakeFleet) -> None:
    primary, replica, sentinel = redis_ha
    fleet = make_fleet({"dev": {}}, redis_url=sentinel.url, shutdown_grace_s=1)
    worker = fleet.start_worker()
    worker.wait_for_line("dev@testhost ready")
    client = fleet.client()
    ids = [client.submit("dev", {"sleep": 0.3, "echo": str(n)}) for n in range(TASKS)]
    lists = priority_lists(client.store.keys, queue_name(fleet.settings.namespace, "dev"))

    # Everything written so far is on the replica before the primary dies.
    on_primary, on_replica = primary.client(), replica.client()
    written = repl_offset(on_primary)
    wait_until(lambda: repl_offset(on_replica) >= written, 10, "the replica to catch up")
    primary.process.kill()
    killed = time.monotonic()
    primary.process.wait(timeout=10)
    queued = sum(on_replica.llen(key) for key in lists)
    assert queued > 0, "the primary died with an empty queue: the test proves nothing"

    watcher = Sentinel([("127.0.0.1", sentinel.port)])  # type: ignore[no-untyped-call]
    failover_s = wait_until(lambda: master_port(watcher) == replica.port, 30,
                            "the sentinel to promote the replica")
    records = [client.wait(task_id, 40) for task_id in ids]
    assert [r.state for r in records] == [State.SUCCEEDED] * TASKS, records
    assert [r.result["echo"] for r in records if r.result] == [str(n) for n in range(TASKS)]
    drained_s = time.monotonic() - killed
    # The publisher's side follows the failover too.
    after = client.wait(client.submit("dev", {"echo": "after"}), 30)
    assert after.state == State.SUCCEEDED
    assert worker.process.poll() is None
    print(f"\nqueued at the kill: {queued} of {TASKS}; promoted after {failover_s:.1f} s; "
          f"all done {drained_s:.1f} s after the kill; attempts {[r.attempts for r in records]}")
