"""Reliability under faults, with real processes, a real engine and real
Redis: a consumer killed mid-task, a container killed mid-task, timeouts,
cancels, Redis restarts and SIGTERM. The agent records the start and end of
every run in its /state volume; overlaps are checked from there."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from support import (
    Fleet,
    MakeFleet,
    child_pids,
    overlapping,
    read_runs,
    start_redis,
    task_processes,
    wait_for_state,
)

from fleet.broker.queues import priority_lists
from fleet.broker.routing import queue_name
from fleet.container.spec import container_name
from fleet.record import ErrorKind, State


def container(fleet: Fleet, docker_client: docker.DockerClient, agent: str = "dev") -> Any:
    return docker_client.containers.get(container_name(fleet.settings, agent))


def wait_for_event(client: Any, task_id: str, kind: str, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    for batch in client.store.events.follow(client.store.keys.events(task_id), block_ms=1000,
                                            deadline=deadline):
        for event in batch:
            if event.type == kind:
                return event.fields
    raise AssertionError(f"no {kind} event for task {task_id}")


def test_a_consumer_killed_mid_run_loses_no_task_and_runs_none_twice_at_once(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    victim = fleet.start_worker("dev")
    survivor = fleet.start_worker("dev")
    client = fleet.client()
    ids = [client.submit("dev", {"sleep": 2, "record": "runs"}) for _ in range(20)]
    victim.wait_for_line("dev@testhost ready")  # its consumer process (a child of `fleet worker`) is up
    survivor.wait_for_line("dev@testhost ready")
    victim_consumers = set(child_pids(victim.process.pid))
    assert victim_consumers
    # Wait until the victim runs a task: its consumer holds that task's lease.
    deadline = time.monotonic() + 60
    doomed = None
    while doomed is None and time.monotonic() < deadline:
        for task_id in ids:
            owner = client.store.leases.owner(task_id)
            if owner and int(owner.split(":")[1]) in victim_consumers:
                doomed = task_id
        if doomed is None:  # wake on the next state change of any task
            client.store.events.wait_any(client.store.events.last_ids(ids), 1000)
    assert doomed is not None, "the victim never ran a task"
    assert survivor.process.poll() is None, "".join(survivor.lines)
    killed_at = time.monotonic()
    for pid in victim_consumers:
        os.kill(pid, signal.SIGKILL)
    os.kill(victim.process.pid, signal.SIGKILL)

    records = [client.wait(task_id, 180) for task_id in ids]
    assert [r.state for r in records] == [State.SUCCEEDED] * 20
    doomed_record = client.status(doomed)
    assert doomed_record.attempts >= 2
    finished = time.monotonic() - killed_at
    assert finished < 90, f"the killed consumer's task took {finished:.0f} s to finish elsewhere"
    lost = [e.fields for e in client.store.events.of_task(doomed) if e.fields.get("error") == "lost"]
    assert lost, "the lost attempt was not recorded"
    runs = read_runs(container(fleet, docker_client), "runs")
    assert overlapping(runs) == []
    assert {r.task for r in runs} == set(ids)
    assert survivor.process.poll() is None


def test_a_killed_container_is_recorded_as_a_crash_and_the_task_retried(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {"transient_backoff_s": 0.2}})
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {"echo": "working", "shell": "sleep 3", "fail_until_attempt": 1})
    wait_for_state(client, task_id, State.RUNNING)
    first = container(fleet, docker_client)
    first.kill()
    record = client.wait(task_id, 120)
    assert (record.state, record.attempts) == (State.SUCCEEDED, 2)
    crashes = [e.fields for e in client.store.events.of_task(task_id) if e.fields.get("error") == "crash"]
    assert crashes and crashes[0]["state"] == "retrying"
    assert record.container != first.short_id  # recreated


def test_a_task_over_its_timeout_is_killed_and_leaves_nothing_behind(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {"timeout_s": 2}})
    fleet.start_worker()
    client = fleet.client()
    record = client.wait(client.submit("dev", {"shell": "sleep 300 & sleep 300"}), 60)
    assert record.state == State.FAILED
    assert record.error is not None and record.error.kind == ErrorKind.TIMEOUT
    agent = container(fleet, docker_client)
    assert task_processes(agent, record.id) == 0
    after = client.wait(client.submit("dev", {"echo": "next"}), 60)
    assert after.state == State.SUCCEEDED and after.container == record.container


def test_nothing_a_task_started_keeps_running_after_it(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    fleet.start_worker()
    client = fleet.client()
    record = client.wait(client.submit("dev", {"shell": "(sleep 300 &) ; setsid sleep 301 &"}), 60)
    assert record.state == State.SUCCEEDED
    assert task_processes(container(fleet, docker_client), record.id) == 0
    killed = [e.fields for e in client.store.events.of_task(record.id)
              if e.type == "leftover_processes_killed"]
    assert killed and int(killed[0]["processes"]) >= 2


def test_cancelling_a_running_task_kills_it_within_seconds(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {"sleep": 300})
    wait_for_state(client, task_id, State.RUNNING)
    start = time.monotonic()
    done = fleet.cli("cancel", task_id)
    assert done.returncode == 0 and "cancelled (was running)" in done.stdout
    ended = wait_for_event(client, task_id, "attempt_ended", timeout=10)
    assert ended["reason"] == "cancelled"
    assert time.monotonic() - start < 5
    assert task_processes(container(fleet, docker_client), task_id) == 0
    assert client.status(task_id).state == State.CANCELLED
    assert client.wait(client.submit("dev", {}), 60).state == State.SUCCEEDED


def test_queued_tasks_survive_a_redis_restart_and_the_worker_keeps_consuming(
        make_fleet: MakeFleet, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    server = start_redis(tmp_path / "redis", *aof)
    fleet = make_fleet({"dev": {}}, redis_url=server.url)
    fleet.start_worker()
    client = fleet.client()
    blocker = client.submit("dev", {"shell": "while [ ! -e /state/go ]; do sleep 0.1; done"})
    wait_for_state(client, blocker, State.RUNNING)
    queued = [client.submit("dev", {"echo": n}) for n in range(10)]
    assert all(client.status(t).state == State.QUEUED for t in queued)

    server.process.terminate()
    server.process.wait(timeout=30)
    server = start_redis(tmp_path / "redis", *aof, port=server.port)
    try:
        container(fleet, docker_client).exec_run(["touch", "/state/go"])
        client = fleet.client()
        assert [client.wait(t, 120).state for t in [blocker, *queued]] == [State.SUCCEEDED] * 11
        time.sleep(30)  # the requirement itself: still consuming 30 s after Redis came back
        assert client.wait(client.submit("dev", {"echo": "later"}), 60).state == State.SUCCEEDED
    finally:
        for worker in fleet.workers:
            worker.stop()
        server.process.terminate()


@pytest.mark.parametrize("grace", [30, 1])
def test_sigterm_lets_a_task_finish_or_hands_it_back(make_fleet: MakeFleet, grace: int) -> None:
    fleet = make_fleet({"dev": {}}, shutdown_grace_s=grace)
    worker = fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {"sleep": 4, "record": "runs"})
    wait_for_state(client, task_id, State.RUNNING)
    assert worker.stop(signal.SIGTERM, timeout=60) == 0
    if grace == 30:  # enough: it finished before the worker exited
        record = client.status(task_id)
        assert (record.state, record.attempts) == (State.SUCCEEDED, 1)
        return
    record = client.status(task_id)  # handed back, waiting for a consumer
    assert record.state == State.RETRYING
    assert record.error is not None and record.error.kind == ErrorKind.LOST
    fleet.start_worker()
    record = client.wait(task_id, 60)
    assert (record.state, record.attempts) == (State.SUCCEEDED, 2)


def test_a_queued_task_whose_message_was_lost_is_published_again_once(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}}, lost_message_after_s=1)
    client = fleet.client()
    lost = client.submit("dev", {"echo": "lost"})
    kept = [client.submit("dev", {"echo": n}) for n in range(3)]
    # Its message vanishes, as a write does with a primary that died before replicating it.
    lists = priority_lists(client.store.keys, queue_name(fleet.settings.namespace, "dev"))
    queue, raw = next((key, m) for key in lists for m in client.store.redis.lrange(key, 0, -1)
                      if json.loads(m)["headers"]["id"] == lost)
    assert client.store.redis.lrem(queue, 1, raw) == 1
    fleet.start_worker()
    fleet.start_worker()  # two consumers: only one publishes it again
    records = [client.wait(task_id, 60) for task_id in [lost, *kept]]
    assert [(r.state, r.attempts) for r in records] == [(State.SUCCEEDED, 1)] * 4
    republished = [e for e in client.store.events.of_task(lost) if e.type == "message_republished"]
    assert len(republished) == 1
    assert not any(e.type == "message_republished" for t in kept for e in client.store.events.of_task(t))
